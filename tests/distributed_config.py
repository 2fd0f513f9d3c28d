"""The run the data-parallel tests train, shared by the test and by its workers (tests/distributed_worker.py).

Twelve 64 x 64 shapes images, 2 epochs of SGD; with 2 workers of 4 images (a global batch of 8) an epoch is one
batch of 8 and one of 4, where the second worker has no image. The backbone's batch norm is frozen, so that N
workers equal one process (trainable batch norm normalises each worker's images apart).
"""

from minidet.train import TrainConfig


def tiny_data_parallel_config(out, batch_size, preset="paper", **changes):
    settings = dict(fpn_channels=16, head_norm=None, num_images=12, image_size=64, batch_size=batch_size, epochs=2,
                    optimizer="sgd", lr=0.01, schedule="step", warmup_iters=2, preset=preset, backbone_norm="frozen",
                    progress=False, out=str(out), auto_anchors=False, checkpoint_every=1)
    settings.update(changes)
    return TrainConfig(**settings)
