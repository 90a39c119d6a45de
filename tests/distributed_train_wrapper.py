"""train.py with the multi-host flags, until train.py has them: initialize() first, then train.main.

    python tests/distributed_train_wrapper.py --coordinator_address=127.0.0.1:PORT --num_processes=2 \
        --process_id=I --cpu_devices=4 --gin_file=... --workdir=...

Besides the flags it makes each process load only its share of the synthetic data and build global batches from it
(mllm_jax.distributed.local_synthetic_batch / global_batch), and gathers the eval predictions that span both
processes (distributed.to_host): the three places in mllm_jax/train/loop.py that the wiring changes. Once train.py
calls distributed.initialize itself, tests/test_distributed_train.py runs train.py instead (one line) and this file
goes away.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

import train  # noqa: E402  (defines --gin_file, --gin_param, --workdir, --cpu_devices, --dry_run)

flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0's coordinator")
flags.DEFINE_integer("num_processes", None, "processes in the job")
flags.DEFINE_integer("process_id", None, "this process's index in [0, num_processes)")
FLAGS = flags.FLAGS


def _host_sharded_loop() -> None:
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from mllm_jax import distributed
    from mllm_jax.train import loop

    meshes = []
    build_mesh = loop.build_mesh

    def recording_build_mesh(pc):
        meshes.append(build_mesh(pc))
        return meshes[-1]

    class HostShardBatches(loop.SyntheticBatches):
        """Training batches: only this host's rows. Eval batches stay whole on every host (few and small), so the
        eval accuracy is computed on the global batch against the gathered predictions."""

        def batch_at(self, step: int) -> dict:
            if self.split != "train":
                return super().batch_at(step)
            rows = distributed.host_local_slice(self.cfg.batch_size // self.microbatches, meshes[-1])
            return distributed.local_synthetic_batch(self, step, rows)

    def put_batch(batch, mesh, *, leading: int):
        if leading == 0:  # an eval batch, whole on every host
            batch = distributed.take_host_rows(batch, mesh, leading)
        out = distributed.global_batch(batch, mesh, P(*([None] * leading), distributed.BATCH_AXES))
        # loop.put_batch hands the model replicated encoder inputs (vision.embed's reshape refuses a batch-sharded
        # pixel array under Explicit axes): each host still loads only its rows; the gather happens on device.
        replicate = jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))
        out["encoder_inputs"] = replicate(out["encoder_inputs"])
        return out

    evaluate = loop.evaluate

    def gathering_evaluate(eval_fn, *args):
        return evaluate(lambda *a: distributed.to_host(eval_fn(*a)), *args)

    loop.build_mesh = recording_build_mesh
    loop.SyntheticBatches = HostShardBatches
    loop.put_batch = put_batch
    loop.evaluate = gathering_evaluate


def main(argv):
    from mllm_jax import distributed

    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                           cpu_devices=FLAGS.cpu_devices)
    _host_sharded_loop()
    return train.main(argv)


if __name__ == "__main__":
    app.run(main)
