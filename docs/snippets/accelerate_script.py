"""A plain Accelerate training script, as Accelerate's own examples are written: it knows
nothing of ddpw. It trains the quick start's classifier and evaluates it."""

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def blobs(n: int, seed: int) -> TensorDataset:
    """``n`` points in the plane, labelled 1 where ``x + y > 0``."""
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x, (x.sum(1) > 0).long())


def main() -> None:
    accelerator = Accelerator()
    set_seed(0)
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    train_loader = DataLoader(blobs(512, seed=0), batch_size=32, shuffle=True)
    test_loader = DataLoader(blobs(256, seed=1), batch_size=32)
    model, optimizer, train_loader, test_loader = accelerator.prepare(
        model, optimizer, train_loader, test_loader)

    for epoch in range(1, 4):
        model.train()
        for x, y in train_loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
        accelerator.print(f"epoch {epoch}: loss {loss.item():.4f}")

    model.eval()
    correct = []
    with torch.no_grad():
        for x, y in test_loader:
            correct.append(accelerator.gather_for_metrics(model(x).argmax(1) == y))
    accuracy = torch.cat(correct).float().mean().item()
    accelerator.print(f"{accelerator.num_processes} processes, accuracy {accuracy:.3f}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
