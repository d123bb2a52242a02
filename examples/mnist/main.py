"""Train, resume and evaluate the MNIST example with ddpw's seed API.

    python examples/mnist/main.py --platform cpu --n-procs 2 --epochs 6 --save-every 3
    python examples/mnist/main.py --platform cpu --n-procs 2 --mode resume --start-at 3 --epochs 6
    python examples/mnist/main.py --platform cpu --n-procs 2 --mode evaluate --start-at 6
    python examples/mnist/main.py --platform slurm --partition debug --n-nodes 2 --n-gpus 0
    python examples/mnist/main.py --platform gpu --n-gpus 1 --mixed-precision bf16 --demo
    python examples/mnist/main.py --platform cpu --n-procs 2 --log-with tensorboard
        (then: tensorboard --logdir logs/training_logs)
    python examples/mnist/main.py --platform cpu --n-procs 1 --n-nodes 2 --node-rank R \
        --master-addr HOST --master-port 29500         (on 2 machines, R = 0 and 1)

``--demo`` does all three in one go: trains to half the epochs, resumes to the end, evaluates.
"""

from __future__ import annotations

import argparse

import torch
from src import MyDataset, MyModel, MyTrainer, my_optimiser

from ddpw.artefacts import ArtefactsConfig
from ddpw.errors import ConfigError
from ddpw.job import JobConfig, JobMode
from ddpw.platform import Platform, PlatformConfig
from ddpw.wrapper import Wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--platform", default="cpu", choices=["cpu", "gpu", "mps", "slurm"])
    parser.add_argument("--n-procs", type=int, default=2, help="CPU processes (per node)")
    parser.add_argument("--n-gpus", type=int, default=1,
                        help="GPUs (per node; 0 on SLURM for CPU processes)")
    parser.add_argument("--n-nodes", type=int, default=1,
                        help="machines: SLURM nodes, or CPU/GPU machines that each run this "
                             "command with their own --node-rank")
    parser.add_argument("--node-rank", type=int, default=None,
                        help="this machine's place among --n-nodes (CPU/GPU, several machines)")
    parser.add_argument("--master-addr", default=None, help="node 0's address (several machines)")
    parser.add_argument("--master-port", type=int, default=None, help="the rendezvous port")
    parser.add_argument("--partition", default="general", help="SLURM partition")
    parser.add_argument("--timeout-min", type=int, default=60, help="SLURM time limit")
    parser.add_argument("--mode", default="train", choices=["train", "resume", "evaluate"])
    parser.add_argument("--start-at", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--save-every", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"],
                        help="autocast the forward pass (fp16 needs CUDA GPUs)")
    parser.add_argument("--data", default=None, help="folder with MNIST's IDX files")
    parser.add_argument("--checkpoint-path", default="./checkpoint")
    parser.add_argument("--log-with", nargs="+", default=None,
                        choices=["tensorboard", "mlflow", "wandb"],
                        help="trackers to log to, beside logs/training_logs/metrics.jsonl")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--demo", action="store_true",
                        help="train to epochs/2, resume to epochs, then evaluate")
    args = parser.parse_args()

    train_set = MyDataset(train=True, root=args.data)
    test_set = MyDataset(train=False, root=args.data)
    platform = Platform.parse(args.platform)
    on_cpus = platform is Platform.CPU or (platform is Platform.SLURM and args.n_gpus == 0)
    try:
        p_config = PlatformConfig(platform=platform, n_procs=args.n_procs if on_cpus else None,
                                  n_gpus=args.n_gpus, n_nodes=args.n_nodes,
                                  node_rank=args.node_rank, master_addr=args.master_addr,
                                  master_port=args.master_port,
                                  partition=args.partition, timeout_min=args.timeout_min,
                                  mixed_precision=args.mixed_precision, verbose=not args.quiet)
    except ConfigError as error:  # fp16 on CPUs, say: one line, not a traceback
        parser.error(str(error))
    # The same initial weights in every run, and on every machine of a job on several.
    torch.manual_seed(p_config.seed)
    a_config = ArtefactsConfig(train_set=train_set, test_set=test_set,
                               batch_size=args.batch_size, model=MyModel(),
                               optimiser_loader=my_optimiser)
    wrapper = Wrapper(p_config, a_config)

    def job(mode: JobMode, start_at: int, epochs: int) -> dict[str, float]:
        j_config = JobConfig(job_type=mode, start_at=start_at, epochs=epochs,
                             save_every=args.save_every, checkpoint_path=args.checkpoint_path,
                             log_with=tuple(args.log_with) if args.log_with else None,
                             log_every_n_steps=10)
        metrics = wrapper.start(MyTrainer(j_config))
        print(f"{mode.name.lower()} (start_at={start_at}, epochs={epochs}): "
              + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in metrics.items()))
        return metrics

    if args.demo:
        half = args.epochs // 2
        job(JobMode.TRAIN, 0, half)
        job(JobMode.RESUME, half, args.epochs)
        job(JobMode.EVALUATE, args.epochs, args.epochs)
    else:
        job(JobMode[args.mode.upper()], args.start_at, args.epochs)


if __name__ == "__main__":
    main()
