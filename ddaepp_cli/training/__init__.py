"""The training core: `state` (everything that changes while a run trains, one state_dict),
`step` (one optimisation step), `metrics` (the metrics.jsonl log) and `compiled` (torch.compile of every
entry point a step calls). `ddaepp_cli.train` drives them."""
