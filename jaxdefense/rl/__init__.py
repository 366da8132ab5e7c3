"""Reinforcement learning in the one training loop: GRPO / REINFORCE maths (`grpo`), K rollouts per
prompt from the KV-cache sampler (`rollout`), pluggable rewards (`rewards`) and the objective base
that collects rollouts on the host before each step (`objective.GRPOObjective`)."""
