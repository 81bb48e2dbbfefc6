"""Run under a 2-process launch (accelerate launch / torchrun on CPU, gloo): each process takes half of the
test_update world's batch and runs the update phase with micro-batches of one sample; the main process
writes the parameter change (minus the gradient: SGD, lr 1, no clipping) per aggregation to OUT.

    accelerate launch --multi_gpu --num_processes 2 [--mixed_precision bf16] tests/dist_update.py OUT [fp32|bf16]
"""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from test_update import build_world  # noqa: E402

from rlkit.algos import AGGREGATIONS  # noqa: E402
from rlkit.config import RLConfig  # noqa: E402
from rlkit.trainers.rl import run_update  # noqa: E402


def main(out: Path, precision: str = "fp32") -> None:
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True, mixed_precision="bf16" if precision == "bf16" else "no")
    model, batch = build_world()
    half = batch.input_ids.shape[0] // acc.num_processes
    mine = batch.select(torch.arange(acc.process_index * half, (acc.process_index + 1) * half))
    deltas = {}
    for aggregation in AGGREGATIONS:
        m = build_world()[0]
        before = {k: v.detach().clone() for k, v in m.named_parameters()}
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        m, opt = acc.prepare(m, opt)
        cfg = RLConfig(max_grad_norm=1e9, max_new_tokens=16, micro_batch_size=1, loss_aggregation=aggregation,
                       kl={"coef": 0.1})
        stats = run_update(m, opt, sched, acc, mine, cfg, beta=0.1)
        after = dict(acc.unwrap_model(m).named_parameters())
        deltas.update({f"{aggregation}/{k}": (before[k] - after[k].detach()).contiguous() for k in before})
        # the loop's metrics are each process's value averaged over processes
        deltas[f"{aggregation}/loss"] = acc.reduce(torch.tensor(stats.policy.loss), "mean")
    acc.wait_for_everyone()
    if acc.is_main_process:
        save_file(deltas, str(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:3])
