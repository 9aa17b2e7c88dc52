"""Peak memory of downstream and sweep does not grow with the number of prompts (issue: they
kept full-vocabulary log-probs of every token for both passes)."""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import embedwalk as ew
from embedwalk.association import downstream, sweep


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storage created inside the mode and still referenced: every aten
    op's outputs are counted once per storage until the last tensor viewing it is freed."""

    def __init__(self):
        super().__init__()
        self.refs: dict = {}
        self.seen: set = set()  # ids of live tensors already counted
        self.current = self.peak = 0

    def _release(self, ident, key, nbytes):
        self.seen.discard(ident)
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and id(t) not in self.seen:
                self.seen.add(id(t))
                st = t.untyped_storage()
                key, nbytes = st.data_ptr(), st.nbytes()
                if key not in self.refs:
                    self.refs[key] = 0
                    self.current += nbytes
                    self.peak = max(self.peak, self.current)
                self.refs[key] += 1
                weakref.finalize(t, self._release, id(t), key, nbytes)
        return out


def _peak(fn) -> int:
    with LiveBytes() as mode:
        fn()
    return mode.peak


def test_downstream_and_sweep_peak_memory_does_not_grow_with_prompts():
    from embedwalk.testing import tiny_model

    model = tiny_model("gpt2")
    prompts = [" ".join(f"w{2 + (5 * i + 3 * j) % 190}" for j in range(24)) for i in range(48)]
    few, many = prompts[:4], prompts
    # one batch's full-vocabulary log-probs, for scale
    per_batch = 4 * 24 * ew.adapt(model).d_vocab * 4
    for call in (
        lambda texts: downstream(model, texts, [0], batch_size=4),
        lambda texts: sweep(model, texts, units=["all", "layer"], batch_size=4, progress=False),
    ):
        small, large = _peak(lambda: call(few)), _peak(lambda: call(many))
        # 12x the prompts: keeping every token's log-probs would add > 11 batches' worth
        assert large - small < 2 * per_batch, (small, large, per_batch)
