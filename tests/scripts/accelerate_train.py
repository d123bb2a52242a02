"""A plain Accelerate training script, written the way Accelerate's own examples are.

It knows nothing of ddpw. At the end it writes, from the main process, what the test checks:
the world it ran in, whether every rank ended with the same parameters, and which samples each
rank trained on.
"""

import argparse
import json

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, is_compiled_module, set_seed
from torch.utils.data import DataLoader, TensorDataset


def main():
    parser = argparse.ArgumentParser(description="Train a small regression model.")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--output", default="result.json")
    parser.add_argument("--fail-on-rank", type=int, default=None)
    args = parser.parse_args()

    accelerator = Accelerator()
    set_seed(0)
    x = torch.randn(96, 4)
    y = x @ torch.tensor([1.0, -2.0, 3.0, 0.5]) + 0.1
    indices = torch.arange(96)
    loader = DataLoader(TensorDataset(x, y, indices), batch_size=8, shuffle=True)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    seen = []
    for _ in range(args.epochs):
        for inputs, targets, index in loader:
            if args.fail_on_rank == accelerator.process_index:
                raise RuntimeError(f"rank {accelerator.process_index} fails on purpose")
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(inputs).squeeze(-1), targets)
            accelerator.backward(loss)
            optimizer.step()
            seen.extend(index.tolist())

    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    all_params = accelerator.gather(params[None])
    all_seen = gather_object([seen])
    if accelerator.is_main_process:
        with open(args.output, "w") as f:
            json.dump({"world_size": accelerator.num_processes,
                       "distributed_type": str(accelerator.distributed_type),
                       "params_equal": bool((all_params == all_params[0]).all()),
                       "mixed_precision": accelerator.mixed_precision,
                       "compiled": is_compiled_module(model),
                       "seen": all_seen, "loss": loss.item()}, f)
    accelerator.end_training()


if __name__ == "__main__":
    main()
