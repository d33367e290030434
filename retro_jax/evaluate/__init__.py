"""retro_jax.evaluate: perplexity, word perplexity and bits per byte; RETRO[ON]/[OFF],
baseline and kNN-LM; the leakage-filtered evaluation; the report.

- `metrics`    token / word perplexity, bits per byte, per-document and per-subset sums
- `scoring`    the jitted forward: log p(target) per token (blockwise output projection)
- `evaluator`  `evaluate(model, db, split, ...) -> EvalResult` over make_eval_windows
- `leakage`    longest common token substring, r(C), bpb(alpha)
- `knn_lm`     the kNN-LM datastore, its search and the interpolation
- `results`    result file names and reading (light: no jax / tensorflow)
- `runner`     `retro-jax eval` (`run_eval`, `evaluate_run`)
- `report`     `retro-jax report` (`run_report`)
- `plots`      `plot_leakage`

Submodules are imported on use, so `retro-jax report` does not load jax.
"""
