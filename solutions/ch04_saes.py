"""Chapter 4 (sparse autoencoders): the reference solution of every exercise.

The SAE module these functions are the pieces of, its trainer, saving and loading, and the
shipped SAEs live in the course's library, `interplab.dictionaries`.
"""

from __future__ import annotations

import time

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interplab.dictionaries import SAE, SAEConfig
from interplab.dictionaries.latents import average_ranks
from interplab.dictionaries.training import resample_sae_
from interplab.probes import fit_probe
from interplab.progress import progress as progress_bar


def sae_encode(
    x: Float[Tensor, "batch d_in"],
    W_enc: Float[Tensor, "d_in d_sae"],
    b_enc: Float[Tensor, " d_sae"],
    b_dec: Float[Tensor, " d_in"],
) -> Float[Tensor, "batch d_sae"]:
    """Feature activations of a standard SAE: the encoder half of f(x) above.

    The encoder reads x relative to the decoder bias (the "pre-encoder bias"), so that
    it sees activations centred where the decoder's reconstructions are.

    Args:
        x: input activations (any number of leading dimensions is fine).
        W_enc: encoder weights.
        b_enc: encoder bias.
        b_dec: decoder bias.

    Returns:
        A float tensor with x's leading dimensions and d_sae columns: every feature's
        activation f(x), never negative. Gradients flow from it to x and to every weight.
    """
    return torch.relu((x - b_dec) @ W_enc + b_enc)


def sae_loss(
    x: Float[Tensor, "batch d"],
    x_hat: Float[Tensor, "batch d"],
    acts: Float[Tensor, "batch d_sae"],
    W_dec: Float[Tensor, "d_sae d"],
    l1_coeff: float,
) -> tuple[Float[Tensor, ""], Float[Tensor, ""], Float[Tensor, ""]]:
    """The training loss of a standard SAE: reconstruction error plus an L1 sparsity penalty.

    The L1 penalty weights each feature's activation by the norm of its decoder row,
    so that the SAE cannot shrink its activations and grow its decoder to dodge the
    penalty (the convention of Anthropic's April 2024 update and of SAELens).

    Args:
        x: the activations to reconstruct.
        x_hat: the SAE's reconstruction of them.
        acts: the SAE's feature activations.
        W_dec: decoder weights; row i is feature i's direction.
        l1_coeff: weight of the sparsity penalty.

    Returns:
        (loss, mse, l1), three scalar float tensors that the optimizer differentiates, so
        gradients must flow through all three to x_hat, acts and W_dec:
        mse: a token's squared error summed over the activation dimensions, averaged over tokens;
        l1: a token's penalty, each feature's absolute activation times the norm of its
        decoder row, summed over features, averaged over tokens;
        loss: mse plus l1_coeff times l1.
    """
    mse = (x_hat - x).pow(2).sum(dim=-1).mean()
    l1 = (acts.abs() * W_dec.norm(dim=-1)).sum(dim=-1).mean()
    return mse + l1_coeff * l1, mse, l1


def remove_parallel_grad(W_dec: Float[Tensor, "d_sae d"], grad: Float[Tensor, "d_sae d"]) -> Float[Tensor, "d_sae d"]:
    """The gradient of the decoder with the component along each decoder row removed.

    With unit-norm decoder rows, a gradient step along a row would only change its
    norm, which the renormalisation after the step undoes anyway; removing that
    component first keeps the optimizer's statistics for what actually moves.

    Args:
        W_dec: decoder weights (rows need not be exactly unit norm, but none is zero).
        grad: the gradient of the loss with respect to W_dec.

    Returns:
        A float tensor shaped like grad: row i is the part of the gradient's row i that is
        orthogonal to decoder row i (its dot product with that row is 0). A gradient row
        already orthogonal to its decoder row comes back unchanged; one parallel to it
        comes back as zeros.
    """
    unit = W_dec / W_dec.norm(dim=-1, keepdim=True)
    parallel = (grad * unit).sum(dim=-1, keepdim=True) * unit
    return grad - parallel


def topk_activation(pre_acts: Float[Tensor, "batch d_sae"], k: int) -> Float[Tensor, "batch d_sae"]:
    """The TopK activation: each row (token) keeps its k largest pre-activations, ReLU'd.

    Args:
        pre_acts: encoder outputs before the activation function.
        k: how many features may fire per row (per token), 1 <= k <= d_sae.

    Returns:
        A float tensor shaped like pre_acts. In every row, exactly k entries are kept,
        and they are the row's k largest pre-activations; a kept entry holds its
        pre-activation if that is positive and 0 if not (when fewer than k values are
        positive, no negative value survives); every other entry is 0. Where several
        entries tie for the k-th place, any of them may be the one kept.
    """
    values, indices = pre_acts.topk(k, dim=-1)
    return torch.zeros_like(pre_acts).scatter(-1, indices, values.relu())


def batchtopk_activation(pre_acts: Float[Tensor, "batch d_sae"], k: int) -> Float[Tensor, "batch d_sae"]:
    """The BatchTopK activation: keep the k * batch largest ReLU'd pre-activations of the whole batch.

    Like TopK, but the budget of k active features per token is shared across the
    batch: an easy token may use fewer features and a hard one more.

    Args:
        pre_acts: encoder outputs before the activation function, [batch, d_sae].
        k: the average number of active features per row.

    Returns:
        A float tensor shaped like pre_acts. Over the whole batch, its k * batch largest
        positive pre-activations keep their value (all positive ones if there are fewer);
        every other entry is 0, so no row is guaranteed exactly k. Where values tie for
        the last place, any of them may be the ones kept.
    """
    acts = pre_acts.relu()
    flat = acts.flatten()
    n_keep = min(k * pre_acts.shape[0], flat.numel())
    values, indices = flat.topk(n_keep)
    return torch.zeros_like(flat).scatter(0, indices, values).reshape(acts.shape)


def resample_dead_features(
    W_enc: Float[Tensor, "d_in d_sae"],
    b_enc: Float[Tensor, " d_sae"],
    W_dec: Float[Tensor, "d_sae d_in"],
    dead: Bool[Tensor, " d_sae"],
    x: Float[Tensor, "batch d_in"],
    x_hat: Float[Tensor, "batch d_in"],
    encoder_scale: float = 0.2,
) -> tuple[Float[Tensor, "d_in d_sae"], Float[Tensor, " d_sae"], Float[Tensor, "d_sae d_in"]]:
    """Point dead features at the inputs the SAE reconstructs worst (returns new tensors).

    A simplified, deterministic version of the resampling of Anthropic's "Towards
    Monosemanticity": a feature that never fires gets no gradient and never recovers,
    so give it a new direction where the SAE currently fails.

    What must hold afterwards:

    - live features keep their weights, and the input tensors are left unchanged;
    - each dead feature is assigned one row of the batch: the dead features, taken in
      increasing index order, get the rows in decreasing order of squared
      reconstruction error (the worst row first; if there are more dead features than
      rows, the order starts again from the worst row);
    - a dead feature's decoder row is the unit vector along its row's error
      (the input minus its reconstruction), so it writes what the SAE missed there;
    - its encoder column points the same way, with norm encoder_scale times the mean
      norm of the live features' encoder columns (times 1.0 when no feature is alive),
      so that it fires on such inputs without dominating at once;
    - its encoder bias is 0.

    Args:
        W_enc, b_enc, W_dec: the SAE's weights.
        dead: which features are dead.
        x: a batch of inputs.
        x_hat: the SAE's reconstructions of x.
        encoder_scale: how large the new encoder columns are, relative to the live
            ones (0.2 in Anthropic's recipe for ReLU SAEs; a TopK SAE needs about 1 for
            a resampled feature to make it into the top k at all).

    Returns:
        (W_enc, b_enc, W_dec): new float tensors shaped like the weights passed in.
    """
    W_enc, b_enc, W_dec = W_enc.clone(), b_enc.clone(), W_dec.clone()
    n_dead = int(dead.sum())
    if n_dead == 0:
        return W_enc, b_enc, W_dec
    residual = x - x_hat
    errors = residual.pow(2).sum(dim=-1)
    worst = errors.topk(min(n_dead, errors.shape[0])).indices
    rows = worst[torch.arange(n_dead) % worst.shape[0]]
    directions = residual[rows] / residual[rows].norm(dim=-1, keepdim=True).clamp_min(1e-8)
    alive = ~dead
    enc_norm = W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
    W_dec[dead] = directions
    W_enc[:, dead] = directions.T * encoder_scale * enc_norm
    b_enc[dead] = 0.0
    return W_enc, b_enc, W_dec


def train_sae(
    acts: Float[Tensor, "n d_in"],
    cfg: SAEConfig,
    *,
    target: Float[Tensor, "n d_out"] | None = None,
    steps: int = 1000,
    batch_size: int = 1024,
    lr: float = 1e-3,
    seed: int = 0,
    dead_after: int = 200,
    resample_every: int = 250,
    progress: bool = True,
) -> SAE:
    """Train an SAE on cached activations and return it (in eval mode).

    What the training must do (``check`` watches the optimizer while your loop runs):

    - It is reproducible: the same seed gives the same SAE (initialisation and batch
      order both follow ``seed``); the SAE is an ``SAE(cfg)`` whose decoder bias starts
      at the mean row of the target, so that it starts by predicting the average
      activation.
    - It takes exactly ``steps`` steps of Adam on the SAE's own loss, each on
      ``batch_size`` rows, every row seen once per epoch in a fresh random order. The
      learning rate is ``lr`` for the first 80% of the steps and falls linearly to 0
      over the last 20% (the final steps polish instead of jumping around).
    - Decoder rows have unit norm after every step, and the gradient reaching the
      optimizer for the decoder has no component along the decoder rows (that
      component would only change a row's length, which the renormalisation undoes,
      while it inflates Adam's statistics).
    - Dead features are brought back: every ``resample_every`` steps during the first
      80% of training, the features that have not fired for ``dead_after`` steps are
      resampled as in `resample_dead_features`, on the current batch (encoder scale
      0.2 for a standard SAE, 1.0 for TopK and BatchTopK), and their Adam statistics
      are cleared (stale moments would throttle or fling the new weights); their
      silence counts restart, and ``sae.info["resampled"]`` counts every feature
      resampled.
    - A progress bar is shown unless ``progress=False``.

    Args:
        acts: the SAE's training inputs (e.g. one layer's residual stream, one row per token).
        cfg: the SAE to build.
        target: what to reconstruct (default: acts; a transcoder's is another activation).
        steps: optimizer steps.
        batch_size: rows per step.
        lr: Adam learning rate.
        seed: seed for the initialisation and the batch order.
        dead_after: steps without firing after which a feature counts as dead.
        resample_every: how often to look for dead features.
        progress: show a progress bar.

    Returns:
        The trained SAE, in eval mode, with unit-norm decoder rows and a dict ``sae.info``
        recording the training (at least "resampled").
    """
    target = acts if target is None else target
    if acts.ndim != 2 or acts.shape[-1] != cfg.d_in:
        raise ValueError(f"acts must be [n_tokens, d_in={cfg.d_in}], got {tuple(acts.shape)}")
    if target.shape != (acts.shape[0], cfg.d_out):
        raise ValueError(f"target must be [n_tokens={acts.shape[0]}, d_out={cfg.d_out}], got {tuple(target.shape)}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be at least 1, got steps={steps}, batch_size={batch_size}")
    device = acts.device
    torch.manual_seed(seed)
    sae = SAE(cfg).to(device)
    with torch.no_grad():
        sae.b_dec.copy_(target.float().mean(dim=0))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    decay_start = int(0.8 * steps)
    order = torch.Generator(device="cpu").manual_seed(seed)
    perm, cursor = torch.randperm(acts.shape[0], generator=order), 0
    since_fired = torch.zeros(cfg.d_sae, dtype=torch.long, device=device)
    n_resampled, t0 = 0, time.time()
    sae.train()
    bar = progress_bar(
        range(steps), disable=not progress, desc=f"training {cfg.architecture} SAE", leave=False, mininterval=1.0
    )
    for step in bar:
        if cursor + batch_size > len(perm):
            perm, cursor = torch.randperm(acts.shape[0], generator=order), 0
        idx = perm[cursor : cursor + batch_size].to(device)
        cursor += batch_size
        x, y = acts[idx], target[idx]
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (steps - step) / max(1, steps - decay_start))
        out = sae.loss(x, y)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        sae.normalize_decoder_()
        with torch.no_grad():
            fired = (out.acts > 0).any(dim=0)
            since_fired = torch.where(fired, 0, since_fired + 1)
            if (step + 1) % resample_every == 0 and step < decay_start:
                dead = since_fired >= dead_after
                if dead.any():
                    resample_sae_(sae, opt, dead, x, y, out.x_hat)
                    since_fired[dead] = 0
                    n_resampled += int(dead.sum())
        if progress and step % 50 == 0:
            bar.set_postfix(
                loss=f"{out.loss.item():.3g}", L0=f"{(out.acts > 0).float().sum(-1).mean():.1f}", refresh=False
            )
    bar.close()
    sae.eval()
    sae.info = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "tokens_seen": steps * batch_size,
        "final_loss": round(out.loss.item(), 5),
        "final_mse": round(out.mse.item(), 5),
        "resampled": n_resampled,
        "seconds": round(time.time() - t0, 1),
    }
    return sae


def explained_variance(x: Float[Tensor, "n d"], x_hat: Float[Tensor, "n d"]) -> float:
    """The fraction of the variance of x that the reconstruction explains (mean-centred).

    Args:
        x: activations, one row per token.
        x_hat: their reconstructions.

    Returns:
        A Python float: one minus the total squared reconstruction error (over all
        tokens and dimensions) divided by the total squared distance of the tokens from
        their mean row. 1 for a perfect reconstruction, 0 for one no better than
        predicting the mean row for every token, negative for a worse one.
    """
    x, x_hat = x.double(), x_hat.double()
    residual = (x - x_hat).pow(2).sum()
    total = (x - x.mean(dim=0)).pow(2).sum()
    return (1.0 - residual / total).item()


def reconstruction_metrics(
    x: Float[Tensor, "n d"], x_hat: Float[Tensor, "n d"], acts: Float[Tensor, "n d_sae"]
) -> dict[str, float]:
    """The field's per-token sparsity and fidelity metrics, averaged over tokens.

    Args:
        x: activations, one row per token.
        x_hat: their reconstructions.
        acts: the SAE's feature activations on them.

    Returns:
        A dict with exactly these four keys, each a Python float:
        "l0": the mean over tokens of the number of non-zero features;
        "mse": the mean over tokens of the squared error summed over dimensions;
        "cosine_sim": the mean over tokens of the cosine similarity between a token's
        activation and its reconstruction (a token whose reconstruction is all zero,
        where no feature fired and there is no bias, counts as 0, not NaN);
        "l2_ratio": the mean over tokens of the reconstruction's norm over the
        activation's norm (below 1 means shrinkage).
    """
    return {
        "l0": (acts != 0).float().sum(dim=-1).mean().item(),
        "mse": (x - x_hat).pow(2).sum(dim=-1).mean().item(),
        "cosine_sim": torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).mean().item(),
        "l2_ratio": (x_hat.norm(dim=-1) / x.norm(dim=-1)).mean().item(),
    }


def feature_density(acts: Float[Tensor, "n d_sae"]) -> Float[Tensor, " d_sae"]:
    """How often each feature fires: the fraction of tokens on which it is non-zero.

    A feature with density 0 on a large sample is dead.

    Args:
        acts: feature activations, one row per token.

    Returns:
        A float tensor with one value per feature: the fraction of tokens (rows) on which
        that feature is non-zero, in [0, 1].
    """
    return (acts != 0).float().mean(dim=0)


def spliced_loss(
    model, sae: SAE, tokens: Int[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"]
) -> dict[str, float]:
    """How much of the model's performance survives when the SAE replaces its activation.

    Three runs of the model are compared: clean; spliced, where the activation at the
    SAE's hook point (``sae.cfg.hook_name``) is replaced by the SAE's reconstruction at
    the positions in mask, other positions keeping their clean activation; and zeroed,
    where that activation is zero at every position (the zero-ablation baseline, as
    SAELens does it). The model is left as it was (no hooks attached afterwards), and the
    function works whether or not the caller has turned gradients off.

    A prediction (the logits at one position for the token at the next) is scored only
    when both positions are in the mask: predictions made from <bos> or of padding are
    not part of the text. All averages run over the scored predictions.

    Args:
        model: a HookedTransformer.
        sae: an SAE whose cfg.hook_name is a hook of the model.
        tokens: input ids.
        mask: True at the tokens the SAE reads and replaces (real tokens: not <bos>, not padding).

    Returns:
        A dict with exactly these five keys, each a Python float:
        "ce_clean", "ce_sae", "ce_zero": mean next-token cross-entropy in each run;
        "loss_recovered": where the spliced loss sits between the zeroed loss (0) and the
        clean loss (1), the share of the zeroing damage the SAE repairs;
        "kl_sae": the mean KL divergence of the spliced next-token distribution from the
        clean one, KL(clean || spliced), the clean distribution weighting the sum.
    """
    hook = sae.cfg.hook_name
    keep = mask.to(tokens.device)

    def splice(act: Tensor, hook) -> Tensor:
        return torch.where(keep[..., None], sae(act), act)

    def zero(act: Tensor, hook) -> Tensor:
        return torch.zeros_like(act)

    with torch.no_grad():
        clean = model(tokens)
        spliced = model.run_with_hooks(tokens, fwd_hooks=[(hook, splice)])
        zeroed = model.run_with_hooks(tokens, fwd_hooks=[(hook, zero)])
    scored = keep[:, :-1] & keep[:, 1:]
    targets = tokens[:, 1:, None]
    ce = {
        name: -lg[:, :-1].log_softmax(-1).gather(-1, targets)[..., 0][scored].mean().item()
        for name, lg in (("ce_clean", clean), ("ce_sae", spliced), ("ce_zero", zeroed))
    }
    log_p = clean[:, :-1].log_softmax(-1)
    log_q = spliced[:, :-1].log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)[scored].mean().item()
    recovered = (ce["ce_zero"] - ce["ce_sae"]) / (ce["ce_zero"] - ce["ce_clean"])
    return {**ce, "loss_recovered": recovered, "kl_sae": kl}


def top_activating_contexts(
    feature_acts: Float[Tensor, "n_seq pos"], mask: Bool[Tensor, "n_seq pos"], k: int
) -> tuple[Float[Tensor, " k"], Int[Tensor, " k"], Int[Tensor, " k"]]:
    """The k (sequence, position) pairs where one feature fires most strongly.

    Args:
        feature_acts: one feature's activation at every token of a dataset.
        mask: True at tokens to consider (positions outside the mask are ignored).
        k: how many to return (fewer if the mask has fewer than k tokens).

    Returns:
        (values, seq, pos): a float tensor and two integer tensors, all of length
        min(k, tokens in the mask). Entry j names a distinct token in the mask (its
        sequence and position) and its activation; the values are the largest
        activations among the masked tokens, in decreasing order. Among tokens with
        equal activations any order is fine, and so is any choice at the last place.
    """
    masked = feature_acts.masked_fill(~mask, float("-inf"))
    k = min(k, int(mask.sum()))
    values, flat = masked.flatten().topk(k)
    n_pos = feature_acts.shape[1]
    return values, flat // n_pos, flat % n_pos


def feature_logit_weights(sae: SAE, model, feature: int) -> Float[Tensor, " d_vocab"]:
    """The direct effect of a feature on the logits: its decoder direction times the unembedding.

    This ignores everything between the SAE's layer and the unembedding (later layers
    and the final layer norm's scale), so it is a first guess at what the feature
    makes the model say, not a measurement.

    Args:
        sae: an SAE reading the residual stream.
        model: a HookedTransformer (its unembedding is model.W_U, [d_model, d_vocab]).
        feature: the feature's index.

    Returns:
        A float tensor with one value per vocabulary token: how much one unit of the
        feature's activation, written along its decoder direction, raises that token's
        logit through the unembedding alone (no unembedding bias: it does not depend on
        the feature).
    """
    return sae.W_dec[feature] @ model.W_U


def steer_with_feature(
    model, sae: SAE, tokens: Int[Tensor, "batch pos"], feature: int, scale: float
) -> Float[Tensor, "batch pos d_vocab"]:
    """The model's logits when a feature's decoder direction is added to its activations.

    The activation at the SAE's hook point (``sae.cfg.hook_name``) is moved by scale
    times the feature's decoder row (as stored), at every position of every sequence;
    nothing else changes. The model is left as it was (no hooks attached afterwards),
    and the function works whether or not the caller has turned gradients off.

    Args:
        model: a HookedTransformer.
        sae: the SAE the feature belongs to.
        tokens: input ids.
        feature: the feature's index.
        scale: how far to move along the feature's (unit-norm) decoder direction.

    Returns:
        The steered logits, a float tensor [batch, pos, d_vocab]; scale 0 gives the clean
        logits.
    """
    direction = sae.W_dec[feature].detach()

    def add(act: Tensor, hook) -> Tensor:
        return act + scale * direction

    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=[(sae.cfg.hook_name, add)])


def feature_aurocs(acts: Float[Tensor, "n d_sae"], labels: Bool[Tensor, " n"]) -> Float[Tensor, " d_sae"]:
    """How well each feature, used as a score, separates tokens with a latent from those without.

    The AUROC of feature i is the probability that a random positive token has a
    higher activation than a random negative one, counting ties as one half. (SAE
    features are zero on most tokens, so ties are everywhere: they must count half.)

    Args:
        acts: feature activations, one row per token.
        labels: True where the latent is present.

    Returns:
        A float tensor with one AUROC per feature: 0.5 is chance (a feature that never
        fires scores exactly 0.5), 1 a perfect detector, 0 a perfect detector of the
        absence.

    Raises:
        ValueError: if labels has no positive or no negative token (AUROC is undefined).
    """
    labels = labels.bool()
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("labels need at least one positive and one negative token")
    ranks = average_ranks(acts)
    rank_sum = ranks[:, labels].sum(dim=-1)
    return ((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).float()


def max_f1(scores: Float[Tensor, " n"], labels: Bool[Tensor, " n"]) -> float:
    """The best F1 of "score >= t" as a detector of the labels, over every threshold t.

    Only thresholds equal to a value of ``scores`` count: tokens with the same score
    are always predicted alike.

    Args:
        scores: one feature's activation per token.
        labels: True where the latent is present.

    Returns:
        A Python float: the largest F1 score (the harmonic mean of precision and recall)
        that predicting "present" for the tokens scoring at least t reaches, over every
        threshold t among the scores.

    Raises:
        ValueError: if labels has no positive token (recall is undefined).
    """
    labels = labels.bool()
    n_pos = int(labels.sum())
    if n_pos == 0:
        raise ValueError("labels need at least one positive token")
    order = scores.argsort(descending=True)
    s, y = scores[order], labels[order].double()
    tp = y.cumsum(0)
    predicted = torch.arange(1, len(s) + 1, dtype=torch.float64, device=s.device)
    end_of_group = torch.ones(len(s), dtype=torch.bool, device=s.device)
    end_of_group[:-1] = s[:-1] != s[1:]
    f1 = 2 * tp / (predicted + n_pos)
    return f1[end_of_group].max().item()


def sparse_probe(
    acts: Float[Tensor, "n d_sae"], labels: Bool[Tensor, " n"], k: int
) -> tuple[Int[Tensor, " k"], Float[Tensor, " k"], Float[Tensor, ""]]:
    """A probe that may read only k of an SAE's latents: which k it reads, and its weights.

    A k-sparse probe asks whether a concept lives in a FEW latents. The k latents are those
    whose mean activation differs most between the two classes on these rows (the absolute
    gap between the class means: a latent that fires on the negatives is as telling as one
    that fires on the positives). On those k columns alone the probe is a binary logistic
    regression fitted to (near) the optimum of the mean cross-entropy, with at most a weak
    L2 penalty. These rows are the training rows: choosing the latents and fitting the
    weights on them, and scoring on other rows, keeps the choice out of the score.

    Args:
        acts: latent activations, one row per training token.
        labels: each row's class (True: positive); both classes must occur.
        k: how many latents the probe may read, from 1 to the number of latents.

    Returns:
        (features, w, b):
        features, an integer tensor of k distinct latent indices (in any order);
        w, a float tensor of k weights, the j-th weighing the j-th chosen latent;
        b, a float scalar tensor (0-d).
        A row's log-odds of being positive are its k chosen activations weighted by w,
        plus b; above 0 the probe says "positive". Held-out rows are scored this way: the
        probe must rank them (AUROC) and classify them (accuracy) about as well as the
        reference does. Latents that never fire (dead) or that are far larger than the
        others must not break the fit, and the function works when the caller has turned
        gradients off.

    Raises:
        ValueError: if k is out of range or the labels hold only one class.
    """
    labels = labels.bool()
    n_pos = int(labels.sum())
    if not 1 <= k <= acts.shape[1]:
        raise ValueError(f"k must be between 1 and {acts.shape[1]} (the number of latents), got {k}")
    if n_pos == 0 or n_pos == len(labels):
        raise ValueError("the labels must contain both classes")
    # 1. Choose on the training rows: the k latents with the largest gap between the class means.
    gap = (acts[labels].double().mean(0) - acts[~labels].double().mean(0)).abs()
    features = gap.topk(k).indices
    # 2. Fit a logistic regression on those columns, standardized so that one weak L2 penalty suits every
    #    latent's scale (a dead latent, with no spread, keeps spread 1 and gets weight 0).
    x = acts[:, features].detach().double()
    mean, std = x.mean(0), x.std(0, unbiased=False)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    W, bias = fit_probe((x - mean) / std, labels.long(), 2, weight_decay=1e-3)
    # 3. Back to raw activations: the log-odds are the difference of the two classes' logits.
    w = (W[:, 1] - W[:, 0]) / std
    b = (bias[1] - bias[0]) - (mean * w).sum()
    return features, w.float(), b.float()
