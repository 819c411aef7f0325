"""The bundled trainer: LoRA SFT with GRBP (MCR's MRSI, E2E-GMNER) and GRPO (MCR's CVO) on the pipeline's shards,
then ``predict`` for ``gmner-pipeline eval``. docs/train.md is the user's guide; the modules, in the order a run uses
them:

    config.py    the preset + --set overrides (our settings typed; `trainer` / `lora` passed to TRL / PEFT)
    data.py      record shards -> D1 / D2 records -> SFT examples and GRPO prompts (datasets)
    models.py    base model + processor, the policy's prompt settings, adapter chains and their identity
    grbp.py      Gaussian risk-aware box perturbation of the targets (pure functions)
    collate.py   GRBP + chat template + labels on the assistant turn only
    sft.py       TRL SFTTrainer + PEFT                      grpo.py   TRL GRPOTrainer + PEFT
    rewards.py   the project's reward on completions mapped back to original pixels
    common.py    what both trainers share (configs, callbacks, checkpoints, saving, the run summary)
    sampler.py   LocalPolicySampler: in-process batched, seeded sampling (predict; grpo_filter)
    predict.py   answers -> original pixels -> JSONL for eval; the gold-knowledge guard
    cli.py       `gmner-pipeline train sft|grpo` and `gmner-pipeline predict`

torch, transformers, peft and trl are imported inside functions, so importing this package (and the CLI) is cheap.
"""
