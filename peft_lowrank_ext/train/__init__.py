"""The training tool behind the command line, one job per module.

* :mod:`.models` — find (the packaged MiniLM, a folder, a hub id) and load the model and tokenizer;
* :mod:`.data` — load text data and turn it into batches;
* :mod:`.loop` — the plain classification loop (``train_classifier``, ``fit``);
* :mod:`.sft` — causal-LM fine-tuning with TRL's ``SFTTrainer``;
* :mod:`.run` — a run's settings (``TrainingConfig``) and its record (``TrainResult``), assembled once for both;
* :mod:`.measure` — memory, parameter counts, optimizer state, step times;
* :mod:`.ranks`, :mod:`.plots` — per-module ranks, their history and the figures.
"""
