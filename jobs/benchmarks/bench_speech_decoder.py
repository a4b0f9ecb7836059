"""Real-time factor of the GLM-4-Voice speech decoder (flow matching + HiFT) on this machine.

Released sizes (random weights: speed does not depend on the values), one utterance of speech
codes, several flow-step counts; prints seconds of compute per second of audio for the flow
decoder, the vocoder and both. Run: ``python -m omnidiff.jobs.benchmarks.bench_speech_decoder``.
"""

from __future__ import annotations

import argparse
import time

import torch

from omnidiff.data.tokenizers.flow_matching import FlowConfig, FlowDecoder
from omnidiff.data.tokenizers.glm4_voice_decoder import Glm4VoiceDecoder
from omnidiff.data.tokenizers.hift import HiftConfig, HiFTGenerator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="audio length to decode")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 4], help="flow steps")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    decoder = Glm4VoiceDecoder(FlowDecoder(FlowConfig()), HiFTGenerator(HiftConfig()))
    codes = torch.randint(0, 16384, (round(12.5 * args.seconds),))
    with torch.no_grad():
        decoder(codes[:3])  # warm-up
        for steps in args.steps:
            decoder.steps = steps
            start = time.perf_counter()
            mel = decoder.mel(codes)
            middle = time.perf_counter()
            wave = decoder.hift(mel[None])[0]
            end = time.perf_counter()
            audio = wave.numel() / decoder.sample_rate
            print(f"{steps:3d} flow steps, {audio:.2f} s of audio, {args.threads} thread(s): "
                  f"RTF {(end - start) / audio:.3f} (flow {(middle - start) / audio:.3f}, "
                  f"HiFT {(end - middle) / audio:.3f})")


if __name__ == "__main__":
    main()
