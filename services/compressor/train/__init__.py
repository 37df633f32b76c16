"""Training-time compression: the fine-tuning loop, QAT, distillation and iterative magnitude pruning."""
