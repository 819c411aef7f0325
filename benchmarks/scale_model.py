"""The teacher-throughput model behind docs/scale.md: GPU-hours and wall hours for the LLM stages with a 72B teacher
on vLLM, from a few stated inputs. Nothing here is measured on a GPU; every input is either measured on this project's
data (marked "measured") or an assumption (marked "assumed", with its reasoning in docs/scale.md). Change an input on
the command line and the table follows.

    python benchmarks/scale_model.py
    python benchmarks/scale_model.py --decode-tps-tp4 3500 --chain-output-tokens 600 --records 1000000
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

H100_BF16_DENSE_FLOPS = 989e12  # NVIDIA H100 SXM datasheet, dense BF16
PARAMS_72B = 72.7e9  # Qwen2.5-72B language model (the VL model adds a ~0.7B vision encoder)


@dataclass
class Replica:
    name: str
    gpus: int
    prefill_tps: float  # prompt tokens per second per replica
    decode_tps: float  # generated tokens per second per replica, at full batch

    def seconds_per_call(self, prompt_tokens: float, output_tokens: float) -> float:
        """Replica-seconds one call occupies: its prefill plus its share of the batched decode."""
        return prompt_tokens / self.prefill_tps + output_tokens / self.decode_tps

    def gpu_seconds_per_call(self, prompt_tokens: float, output_tokens: float) -> float:
        return self.gpus * self.seconds_per_call(prompt_tokens, output_tokens)


def replicas(args: argparse.Namespace) -> list[Replica]:
    prefill_tp4 = 4 * H100_BF16_DENSE_FLOPS * args.prefill_mfu / (2 * PARAMS_72B)
    return [Replica("TP4 (4x H100)", 4, prefill_tp4, args.decode_tps_tp4),
            Replica("TP8 (8x H100)", 8, 2 * prefill_tp4, args.decode_tps_tp4 * args.tp8_decode_gain)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # workload (measured on Twitter-GMNER v2.0 train where marked)
    p.add_argument("--tweets", type=int, default=7000, help="measured: Twitter-GMNER v2.0 train")
    p.add_argument("--entities", type=int, default=11779, help="measured: entities in train")
    p.add_argument("--unique-entity-share", type=float, default=7903 / 11779,
                   help="measured: distinct (text, type) / entities in train (the knowledge cache's saving)")
    p.add_argument("--records", type=int, default=1_000_000, help="the large run: records per style")
    # per-call token counts
    p.add_argument("--chain-prompt-tokens", type=float, default=1200,
                   help="assumed: ~800 image tokens (Qwen2.5-VL, <=1024*28*28 px) + ~400 text")
    p.add_argument("--chain-output-tokens", type=float, default=450,
                   help="assumed: 1.8x the measured template chain (~250 tokens)")
    p.add_argument("--chain-calls", type=float, default=1.3, help="assumed: calls per kept chain (re-asks)")
    p.add_argument("--knowledge-calls", type=float, default=5,
                   help="VKEL: 3 LLMs + voter + summary per entity")
    p.add_argument("--knowledge-prompt-tokens", type=float, default=600, help="assumed split of VKEL's ~900")
    p.add_argument("--knowledge-output-tokens", type=float, default=300, help="assumed split of VKEL's ~900")
    # engine
    p.add_argument("--prefill-mfu", type=float, default=0.40, help="assumed: prefill model-FLOPs utilisation")
    p.add_argument("--decode-tps-tp4", type=float, default=2500,
                   help="assumed: output tokens/s of one BF16 TP4 H100 replica at full batch (docs/scale.md)")
    p.add_argument("--tp8-decode-gain", type=float, default=1.6,
                   help="assumed: TP8 decode rate over TP4 (all-reduce cost keeps it under 2)")
    p.add_argument("--gpus", type=int, default=64, help="GPUs in the cluster for the large run")
    args = p.parse_args(argv)

    kept = {"Twitter-GMNER train": args.tweets, f"{args.records:,} records": args.records}
    entities_per_record = args.entities / args.tweets
    print("inputs: chain call %d in / %d out tokens x %.1f calls; knowledge %d calls x (%d in / %d out) per distinct "
          "entity; %.2f entities/record, %.0f%% distinct" % (
              args.chain_prompt_tokens, args.chain_output_tokens, args.chain_calls, args.knowledge_calls,
              args.knowledge_prompt_tokens, args.knowledge_output_tokens, entities_per_record,
              100 * args.unique_entity_share))
    for rep in replicas(args):
        chain_gpu_s = args.chain_calls * rep.gpu_seconds_per_call(args.chain_prompt_tokens, args.chain_output_tokens)
        know_gpu_s = args.knowledge_calls * rep.gpu_seconds_per_call(args.knowledge_prompt_tokens,
                                                                      args.knowledge_output_tokens)
        calls_per_s = 1 / rep.seconds_per_call(args.chain_prompt_tokens, args.chain_output_tokens)
        print(f"\n{rep.name}: prefill {rep.prefill_tps:,.0f} tok/s, decode {rep.decode_tps:,.0f} tok/s -> "
              f"{calls_per_s:.2f} chain calls/s per replica; {chain_gpu_s:.2f} GPU-s per kept chain, "
              f"{know_gpu_s:.2f} GPU-s per distinct entity")
        print(f"  {'dataset':28s} {'MLLM CoT GPU-h':>15s} {'knowledge GPU-h':>16s} "
              f"{'wall h, 8 GPUs':>15s} {'wall h, ' + str(args.gpus) + ' GPUs':>16s}")
        for name, n in kept.items():
            distinct_entities = n * entities_per_record * args.unique_entity_share
            cot_h = n * chain_gpu_s / 3600
            know_h = distinct_entities * know_gpu_s / 3600
            total = cot_h + know_h
            print(f"  {name:28s} {cot_h:15.1f} {know_h:16.1f} {total / 8:15.2f} {total / args.gpus:16.2f}")


if __name__ == "__main__":
    main()
