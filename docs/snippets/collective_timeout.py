"""A Trainer whose processes give up on a stuck collective after 5 minutes."""

from datetime import timedelta

from accelerate.utils import InitProcessGroupKwargs
from quick_start import Classifier, blobs, sgd
from torch import nn

from ddpw import ArtefactsConfig, JobConfig, Platform, PlatformConfig, Wrapper


class PatientClassifier(Classifier):
    def accelerator_kwargs(self, p_config):
        kwargs = super().accelerator_kwargs(p_config)  # keep ddpw's own
        handler = InitProcessGroupKwargs(timeout=timedelta(minutes=5))
        return {**kwargs, "kwargs_handlers": [handler]}


if __name__ == "__main__":
    a_config = ArtefactsConfig(train_set=blobs(512, seed=0), batch_size=32,
                               model=nn.Linear(2, 2), optimiser_loader=sgd)
    p_config = PlatformConfig(platform=Platform.CPU, n_procs=2)
    Wrapper(p_config, a_config).start(PatientClassifier(JobConfig(epochs=1, save_every=0)))
