"""Integrations of moebalance's balancers and plans into deep-learning frameworks (torch, torch.distributed)."""
