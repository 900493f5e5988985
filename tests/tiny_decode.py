"""A tiny random Switch model with two prefilled decode states of the same prompts (tests of state changes between
decode steps: one state changed by the code under test, the other by a reference)."""

import torch


def tiny_model_two_states(max_len: int, rows: int = 4, seed: int = 0):
    """(model, tokens [rows] for a step, state a, state b): eval mode, the same prompts of 7 tokens."""
    from models.config import preset
    from models.switch import Switch

    torch.manual_seed(seed)
    model = Switch(preset("tiny")).eval()
    ids = torch.randint(2, 100, (rows, 7))
    tok = torch.randint(2, 100, (rows,))
    with torch.no_grad():
        return model, tok, model.prefill(ids, max_len=max_len), model.prefill(ids, max_len=max_len)
