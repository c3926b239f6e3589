"""Benchmarks of TAGI's quality, speed and memory; run each from the repository root as `python -m bench.NAME`.

`python -m bench.run` runs the speed and memory set; `bench.quality`, `bench.ablation`, `bench.wording` and
`bench.base_pretraining` run the quickstart over seeds and variants.
"""
