"""training: the policy trained from the shards (floor 4: imports refs and below).

    losses, unpaired_losses   the DPO loss family; KTO and the other losses on unpaired examples
    policy_pass     one policy pass over pairs (train and eval): forward, losses, metric sums
    trainer         the training loop (one process or a Ray Train worker)
    run_folder      the run's output folder before it starts: resume or start over; `TrainingError`
    parallel        one process, DDP or FSDP2, LoRA on top
    distributed     rank, world size and the few collectives the loop needs
    checkpoint      sharded checkpoints that resume across world sizes; `final/` as a plain model
    early_stopping  stop when held-out metrics stop improving
    metrics         metrics.jsonl and TensorBoard
    runs            the run a saved model belongs to (its train_config.yaml)
"""
