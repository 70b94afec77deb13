import sys, json, time, math, torch, argparse
import variants
from interplab.tinyworld.train import model_config, batches
from interplab.tinyworld.evaluate import answer_logits, _top1
from interplab.tinyworld.generator import generate
from transformers import GPT2LMHeadModel
p = argparse.ArgumentParser()
p.add_argument("--name"); p.add_argument("--tokens", type=float, default=1.5e6)
p.add_argument("--lr", type=float, default=2e-3); p.add_argument("--bs", type=int, default=128)
p.add_argument("--mix", default='{"rooms":1.0}'); p.add_argument("--cfg", default='{}')
p.add_argument("--threads", type=int, default=1); p.add_argument("--every", type=float, default=250e3)
p.add_argument("--wd", type=float, default=0.05); p.add_argument("--seed", type=int, default=0)
a = p.parse_args()
torch.set_num_threads(a.threads); torch.manual_seed(a.seed)
model = GPT2LMHeadModel(model_config(**json.loads(a.cfg)))
mix = json.loads(a.mix)
import os
if os.environ.get("SINPOS"):
    sc = float(os.environ["SINPOS"]); P, D = model.transformer.wpe.weight.shape
    pos = torch.arange(P)[:, None].float(); i = torch.arange(0, D, 2).float()
    ang = pos / (10000 ** (i / D)); pe = torch.zeros(P, D); pe[:, 0::2] = torch.sin(ang); pe[:, 1::2] = torch.cos(ang)
    with torch.no_grad(): model.transformer.wpe.weight.copy_(pe * sc)
decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
nod = [p for n, p in model.named_parameters() if p.dim() < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.wd}, {"params": nod, "weight_decay": 0}], lr=a.lr, betas=(0.9, 0.98))
evald = {f: generate(300, seed=5, split="test", families=[f]) for f in ["rooms", "induction", "ioi", "facts"]}
import roomeval_lib
orig_docs = roomeval_lib.orig_docs(300)
def ev():
    model.eval()
    r = {f: round(_top1(answer_logits(model, d)), 3) for f, d in evald.items() if mix.get(f, 0) > 0}
    b = roomeval_lib.breakdown(model, orig_docs); r["orig_all"] = b["all"][0]; r["orig_notlast"] = b["notlast"][0]
    model.save_pretrained(f"/tmp/exp/{a.name}")
    model.train(); return r
seen, step, t0, nxt = 0, 0, time.time(), a.every
tokens = a.tokens; warm = 100
for ids, mask in batches(a.seed, a.bs, mix=mix):
    lr = a.lr * min(1, (step + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1, seen / tokens))))
    for g in opt.param_groups: g["lr"] = lr
    loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(~mask, -100)).loss
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    seen += int(mask.sum()); step += 1
    if seen >= nxt or seen >= tokens:
        print(json.dumps({"name": a.name, "tok": seen, "s": round(time.time() - t0), "loss": round(loss.item(), 3), **ev()}), flush=True)
        nxt += a.every
    if seen >= tokens: break
model.save_pretrained(f"/tmp/exp/{a.name}")
