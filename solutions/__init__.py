"""Reference solutions for every exercise of the course, imported as `interplab.solutions`.

Each module matches a chapter; each function is the single source of truth for what
its exercise asks. `interplab.show_solution(name)` prints one.
"""
