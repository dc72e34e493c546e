"""Training: SFT warm start, self-play actors, replay, learner losses, the AlphaZero loop."""
