"""The co-firing counter the Tree HSAE re-assigns children with (trainer/coactivation.py)."""

import torch

from trainer.coactivation import CoFiring
from trainer.models.base import LevelCode


def test_cofiring_dense_and_sparse_counts_agree_on_random_codes(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    parents = LevelCode(torch.randint(-1, 7, (300, 3), generator=generator), torch.ones(300, 3))
    children = LevelCode(torch.randint(-1, 20, (300, 4), generator=generator), torch.ones(300, 4))
    answers = []
    for limit in (CoFiring.DENSE_PAIRS_MAX, 0):
        monkeypatch.setattr(CoFiring, "DENSE_PAIRS_MAX", limit)
        counter = CoFiring(7, 21, torch.device("cpu"))  # child 20 never fires
        for start in (0, 100, 200):
            chunk = (LevelCode(c.indices[start : start + 100], c.values) for c in (parents, children))
            counter.update(*chunk)
        answers.append(counter.best_parents())
    assert (counter.dense is None) and answers[0][0][20] == -1 and answers[0][1][20] == -1
    torch.testing.assert_close(answers[0], answers[1], rtol=0, atol=0)
