"""How a batch is made, host to device. Everything here runs on the host (numpy) until the last step.

1. **Samples.** Synthetic: ``synthetic`` draws random images/clips and their questions and answers over the word
   vocabulary of ``tokenizer`` (``tokenizer.build_tokenizer`` writes its tokenizer.json). Real files:
   ``datasets.sources`` reads LLaVA conversation JSON and JSONL audio captions (``datasets.media`` decodes images and
   log-mel frames, ``datasets.text`` applies the chat template); ``processor`` is the HF-style processor for one's own
   messages (image/audio preprocessing, ``processor.chat`` templates).
2. **Token ids with placeholder runs.** One run of placeholder tokens per image or clip, as long as
   ``ModelConfig.features_per_instance(name)`` (``batching.BatchBuilder``, ``datasets.text.ConversationEncoder``,
   ``processor.multimodal``).
3. **Labels, shifted before anything is permuted.** The next token where the answer is predicted, else
   ``mllm_jax.batch.IGNORE``; the shift happens here, in the original order, so later permutations keep the loss.
4. **Metadata.** ``positions``, ``segment_ids`` (packed sample; 0 = padding), ``span_ids`` (one per encoder instance)
   and ``feature_index`` (into the modality's projected features, sample-major) — docs/contracts.md.
5. **Packing.** Several samples per row as segments in static, padded buckets: ``batching`` (``samples_per_row``)
   and ``datasets.packing``; ``datasets.balance`` and ``datasets.workload`` assign real samples to data ranks and
   microbatches by predicted work, and ``datasets.loader.Loader`` plans every global batch identically on every host,
   decodes only this host's share in the background, and checkpoints its position.
6. **Microbatches.** A leading axis [M, B/M, ...], each microbatch a self-contained batch (``SyntheticBatches``,
   ``Loader``); ``train_data`` gives the run this host's rows of each global batch (synthetic or real) and the
   state saved in the checkpoint.
7. **The context permutation** (``ParallelConfig.context > 1``): ``context_batches.permute_for_context`` plans the
   128-token row blocks over the ``context`` ranks (``mllm_jax.parallel.context.plan``) and moves every token array.
8. **Encoder instances over the devices** (``DataConfig.encoder_balance``): ``encoder_balance`` gives each step's
   images and clips to every device by cost (``mllm_jax.parallel.instance_balance``) and remaps ``feature_index``;
   with ``DataConfig.encoder_cache`` a frozen encoder's features come from ``encoder_cache`` instead (docs/encoders.md).
9. **Placement.** ``placement.put_batch`` stitches the hosts' rows into global ``jax.Array``s sharded as the model
   expects: token arrays over ``data`` x ``fsdp`` (and ``context`` on the sequence), encoder inputs over every mesh
   axis that divides their instance count.

This package sits below ``mllm_jax.train`` and never imports it. Guide: docs/data.md; the whole step:
docs/architecture.md.
"""

from mllm_jax.data.batching import IGNORE, BatchBuilder, SyntheticBatches, check_placeholders, feature_counts
from mllm_jax.data.tokenizer import TextCodec, build_tokenizer

__all__ = ["IGNORE", "BatchBuilder", "SyntheticBatches", "check_placeholders", "feature_counts", "TextCodec",
           "build_tokenizer"]
