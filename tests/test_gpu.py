"""GPU-only paths: vLLM rollouts (colocate) for RL and vLLM generation for evaluation.  Marked `gpu`; the default
test run deselects them (`-m 'not gpu'`).  Run on a CUDA machine with the [vllm] extra: pytest -m gpu."""

import importlib.util

import pytest

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs the [vllm] extra"),
              pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")]


def test_grpo_with_vllm_colocate_rollouts(tiny_model_dir, world_dir, tmp_path):
    from patho_r1.rl.config import RLPhaseConfig
    from patho_r1.rl.grpo import run_rl

    cfg = RLPhaseConfig(model=str(tiny_model_dir), data=str(world_dir / "rl/train.jsonl"),
                        output_dir=str(tmp_path / "rl"), algorithm="dapo", max_steps=2,
                        per_device_train_batch_size=8, num_generations=4, max_completion_length=32,
                        wandb={"mode": "disabled"}, use_cpu=False, dtype="bfloat16",
                        rollout={"engine": "vllm", "vllm_mode": "colocate", "gpu_memory_utilization": 0.2,
                                 "max_model_length": 1024})
    result = run_rl(cfg)
    assert result.global_step == 2


def test_vllm_generation_for_evaluation(tiny_model_dir, world_dir):
    from patho_r1.eval.benchmarks import evaluate_benchmark, get_benchmark
    from patho_r1.eval.generation import SamplingConfig, make_generator

    generator = make_generator(str(tiny_model_dir), engine="vllm", gpu_memory_utilization=0.2, max_model_len=1024)
    bench = get_benchmark("mcq")
    report, rows = evaluate_benchmark(bench, bench.read(world_dir / "eval/PathoSynth_MCQ.tsv", limit=8).records,
                                      generator, SamplingConfig(max_new_tokens=16))
    assert report["n"] == 8 and all(isinstance(r.response, str) for r in rows)


def test_colocated_rollouts_share_the_pixel_budget_and_leave_no_encoder_cache(tiny_model_dir, world_dir, tmp_path,
                                                                               monkeypatch):
    """Three colocated RL steps with sleep mode, as the GPU recipes run them: vLLM's processor has the HF processor's
    pixel budget, and after every rollout vLLM's encoder cache is empty (it held the rollout's images before)."""
    from patho_r1.rl import dapo, vllm_engine
    from patho_r1.rl.config import RLPhaseConfig
    from patho_r1.rl.grpo import build_rl_trainer

    budget = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 9}
    seen = []  # (entries before the clear, entries after it), one per rollout
    clear = vllm_engine.clear_vllm_encoder_cache

    def recording_clear(llm):
        before = vllm_engine.vllm_encoder_cache_entries(llm)
        clear(llm)
        seen.append((before, vllm_engine.vllm_encoder_cache_entries(llm)))

    monkeypatch.setattr(dapo, "clear_vllm_encoder_cache", recording_clear)
    cfg = RLPhaseConfig(model=str(tiny_model_dir), data=str(world_dir / "rl/train.jsonl"),
                        output_dir=str(tmp_path / "rl"), algorithm="dapo", max_steps=3,
                        per_device_train_batch_size=8, num_generations=4, max_completion_length=32,
                        wandb={"mode": "disabled"}, use_cpu=False, dtype="bfloat16", **budget,
                        rollout={"engine": "vllm", "vllm_mode": "colocate", "gpu_memory_utilization": 0.2,
                                 "max_model_length": 1024, "enable_sleep_mode": True})
    trainer = build_rl_trainer(cfg)
    try:
        llm = trainer.vllm_generation.llm
        assert llm.model_config.multimodal_config.mm_processor_kwargs == budget
        assert trainer.processing_class.image_processor.size == {"shortest_edge": budget["min_pixels"],
                                                                 "longest_edge": budget["max_pixels"]}
        trainer.train()
    finally:
        trainer.reward_set.close()
    assert trainer.state.global_step == 3 and len(seen) >= 3, seen
    assert all(after == 0 for _, after in seen), seen
    assert any(before for before, _ in seen), seen  # the cache path is the live one: it held the images
