"""The peer's training step: lucidrains' retro-pytorch (PyTorch, CPU) on the cpu-small workload.

Runs in the peer's own virtualenv (setup_venv.sh), not in ours:

    $PEER_VENV/bin/python benchmarks/peer/retro_pytorch_step.py [--steps 5] [--json-out F]

Prints one JSON line in the format of workload.record. The model is built from the workload's
numbers; the peer numbers decoder layers from 1 as the paper does, so CCA layers (5, 8) go in
unchanged, and `enc_cross_attn_layers=None` makes every encoder layer cross-attend to the
decoder chunk (as the paper's encoder and our benchmark's do). The peer does not pass
RETRO(heads=...) down to its attention layers (they keep their default of 8): the script
checks the built model has the workload's heads and CCA layers before timing anything.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import CPU_SMALL, emit, record, time_steps  # noqa: E402


def _stub_autofaiss() -> bool:
    """retro_pytorch's package imports its retrieval helpers, which import autofaiss at module
    level; the model never calls it, and autofaiss pins numpy < 2. A stub module stands in
    when it is not installed."""
    try:
        import autofaiss  # noqa: F401
        return False
    except ImportError:
        stub = types.ModuleType("autofaiss")

        def build_index(*args, **kwargs):
            raise RuntimeError("autofaiss is stubbed in the benchmark's virtualenv")

        stub.build_index = build_index
        sys.modules["autofaiss"] = stub
        return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="timed steps after the warm-up")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=0, help="parameter initialisation seed")
    ap.add_argument("--json-out", default=None, help="also append the JSON line here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    stubbed = _stub_autofaiss()
    from retro_pytorch import RETRO
    from retro_pytorch.retro_pytorch import Attention

    w = CPU_SMALL
    torch.manual_seed(args.seed)
    model = RETRO(num_tokens=w.vocab, max_seq_len=w.seq_len, enc_dim=w.encoder_width,
                  enc_depth=w.encoder_layers, enc_cross_attn_layers=None, dec_dim=w.width,
                  dec_depth=w.layers, dec_cross_attn_layers=w.cca_layers, heads=w.heads,
                  dim_head=w.head_dim, chunk_size=w.chunk, pad_id=0)
    model.train()
    attention = [m for m in model.modules() if isinstance(m, Attention)]
    if any(m.heads != w.heads or m.to_q.out_features != w.heads * w.head_dim
           for m in attention):
        sys.exit("retro_pytorch_step.py: the built model's attention heads differ from the "
                 "workload's; this retro-pytorch version maps its arguments differently")
    cca = [i + 1 for i, layer in enumerate(model.decoder.layers) if layer[1] is not None]
    if tuple(cca) != w.cca_layers:
        sys.exit(f"retro_pytorch_step.py: CCA built at layers {cca}, the workload has "
                 f"{list(w.cca_layers)}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=w.learning_rate,
                                  betas=(w.adam_b1, w.adam_b2), eps=w.adam_eps,
                                  weight_decay=w.weight_decay)
    sequence, neighbours = (torch.from_numpy(a) for a in w.batch_arrays())

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = model(sequence, neighbours, return_loss=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    seconds, losses, cpu = time_steps(step, w, args.steps)
    emit(record("retro-pytorch", w, sum(p.numel() for p in model.parameters()), seconds,
                torch_version=torch.__version__, torch_threads=torch.get_num_threads(),
                retro_pytorch_version=importlib.metadata.version("retro-pytorch"),
                loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4),
                step_s_all=[round(s, 4) for s in seconds], autofaiss_stubbed=stubbed, **cpu),
         args.json_out)


if __name__ == "__main__":
    main()
