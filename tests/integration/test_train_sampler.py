"""LocalPolicySampler, the in-process sampler predict uses and grpo_filter will: shapes, seeding, greedy, images."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")

from gmner_pipeline import student  # noqa: E402
from gmner_pipeline.train.sampler import LocalPolicySampler  # noqa: E402
from support.train_records import toy_image, toy_record  # noqa: E402

pytestmark = pytest.mark.integration


def test_sampling_is_batched_seeded_and_greedy_at_temperature_zero(trained_sft):
    sampler = LocalPolicySampler(adapter=str(trained_sft["output"]), batch_size=2, device="cpu")
    prompts = [student.build_messages(r, sampler.prompt) for r in trained_sft["records"][:3]]  # 2 batches
    kwargs = dict(n=3, temperature=1.5, top_k=200, top_p=0.95, max_new_tokens=6)
    first = sampler.sample(prompts, seed=11, **kwargs)
    assert [len(group) for group in first] == [3, 3, 3]
    assert sampler.sample(prompts, seed=11, **kwargs) == first  # same seed, same texts
    assert sampler.sample(prompts, seed=12, **kwargs) != first
    greedy = sampler.sample(prompts, n=2, temperature=0.0, max_new_tokens=6)
    assert all(a == b for a, b in greedy) and sampler.generate(prompts, max_new_tokens=6) == [g[0] for g in greedy]
    identity = sampler.identity()
    assert identity["adapter_sha256"] == trained_sft["result"].identity and identity["base_model"]


def test_a_multimodal_policy_samples_with_the_image(tmp_path, tiny_qwen2_vl):
    sampler = LocalPolicySampler(str(tiny_qwen2_vl), device="cpu")
    assert sampler.multimodal and sampler.prompt.image and sampler.prompt.frame.kind == "qwen2_vl"
    image = toy_image(tmp_path, 112, 84)
    records = [toy_record(i, image=image, width=112, height=84) for i in range(2)]
    out = sampler.sample([student.build_messages(r, sampler.prompt) for r in records], n=2, temperature=1.0,
                         max_new_tokens=4, seed=0)
    assert [len(g) for g in out] == [2, 2] and all(isinstance(t, str) for g in out for t in g)
    assert sampler.identity()["adapter"] is None


def test_a_qwen2_5_vl_frame_reaches_the_processor_unchanged(tmp_path, tiny_qwen2_vl):
    """Qwen2.5-VL boxes are pixels of the smart_resized image: the processor must see exactly that image."""
    from PIL import Image
    from transformers import AutoProcessor

    from gmner_pipeline.frames import FrameConfig, model_image_size, prepare_image
    from gmner_pipeline.train.models import Policy, configure_processor

    processor = AutoProcessor.from_pretrained(tiny_qwen2_vl)
    frame = FrameConfig(kind="qwen2_5_vl")
    configure_processor(Policy(None, processor, None, True, "qwen2_5_vl"), frame)
    original = Image.new("RGB", (640, 427))
    resized = prepare_image(original, frame)
    assert resized.size == model_image_size(frame, 640, 427) and resized.size != original.size
    grid = processor.image_processor(images=[resized], return_tensors="pt")["image_grid_thw"][0]
    patch = processor.image_processor.patch_size
    assert (int(grid[2]) * patch, int(grid[1]) * patch) == resized.size  # no second resize: the frame holds
