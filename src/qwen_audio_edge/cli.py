"""`qwen-audio-edge` command line: export, run, stream, compare, eval, bench, demo (the application layer).

Errors we raise on purpose print one line (`error: …`) and exit 2; anything unexpected prints one
line too (with `--debug` for the traceback). Heavy imports happen inside the commands so that
`--help` and error paths stay fast; `export` and `demo` need the [export] extra (transformers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .runtime.errors import OptionsError, QwenAudioEdgeError

DEMO_DIR = "qae-demo"  # `demo`'s default directory: README's next command reads qae-demo/artifacts
DEMO_MARKER = "qae-demo.json"  # written first ({"complete": false}) and completed last: tells a demo dir from others


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    g.add_argument(
        "--dtype",
        default=None,
        choices=["fp32", "fp16", "bf16"],
        help="decoder activation dtype (default fp32 on CPU, fp16 on CUDA)",
    )
    g.add_argument(
        "--max-context",
        type=int,
        default=None,
        help="KV cache positions (default: the config's max_position_embeddings, capped to fit memory)",
    )
    g.add_argument(
        "--encoder-backend",
        default="onnx",
        choices=["onnx", "torch"],
        help="ONNX Runtime (default) or the torch module (GPUs without onnxruntime-gpu)",
    )
    g.add_argument("--encoder-precision", default=None, choices=["fp32", "fp16"], help="which exported encoder to run")
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch and ONNX Runtime, one budget (default: the free cores, docs/threads.md)",
    )
    g.add_argument(
        "--w4-kernel",
        default="auto",
        choices=["auto", "ref", "cpu", "triton"],
        help="W4 matmul path for GPTQ decoders (auto: CPU int4 op on CPU, Triton on CUDA)",
    )
    g.add_argument(
        "--no-fuse",
        action="store_true",
        help="keep the checkpoint's separate q/k/v and gate/up projections and plain torch ops (no fused "
        "Triton kernels on CUDA): for debugging, hooks, or a GPU where Triton does not work",
    )
    g.add_argument(
        "--no-w4-tune",
        action="store_true",
        help="CUDA: use the default Triton launch configs instead of timing candidates per layer shape "
        "on first use (faster first start, slower decode)",
    )
    g.add_argument(
        "--embeddings",
        default="auto",
        choices=["auto", "dtype", "host", "int8", "fp32", "fp16", "bf16"],
        help="where the token-embedding table lives: host memory (pinned), int8 or a float dtype on the device, "
        "or dtype (the activation dtype on the device); auto: host on CUDA, dtype on CPU (docs/memory.md)",
    )
    g.add_argument(
        "--kv-cache",
        default="auto",
        choices=["auto", "dtype", "int8", "fp32", "fp16", "bf16"],
        help="KV cache storage: int8 (per position and head, half of fp16) or a float dtype; auto = dtype, "
        "the activation dtype (docs/memory.md)",
    )
    g.add_argument(
        "--lm-head",
        default="auto",
        choices=["auto", "dtype", "int8"],
        help="output head: int8 (the export's side file, else quantized at load) or dtype (dense); "
        "auto: int8 when the export wrote the side file (docs/memory.md)",
    )
    g.add_argument("--no-verify", action="store_true", help="check file sizes only, skip sha256 of the artifacts")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "generation",
        "Defaults come from the checkpoint's generation_config.json, read as transformers reads it: "
        "a key it does not set means transformers' default (greedy, no repetition penalty, …). A flag overrides it.",
    )
    g.add_argument("--prompt", default=None, help="text after the audio in the user turn")
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="answer length limit (default: the generation config's max_new_tokens, else 256)",
    )
    g.add_argument(
        "--greedy",
        action="store_true",
        help="argmax decoding (do_sample=false) even where the generation config samples",
    )
    g.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="sampling temperature; --temperature, --top-k or --top-p turn sampling on (not with --greedy)",
    )
    g.add_argument("--top-k", type=int, default=None, help="sample from the K most likely tokens (0: all)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (1: off)")
    g.add_argument("--repetition-penalty", type=float, default=None, help="1.0: off (applies to greedy decoding too)")
    g.add_argument("--seed", type=int, default=None, help="seed of the sampler (a fresh random seed by default)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the generation config's eos_token_id")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-audio-edge", description="Edge inference runtime for Qwen2-Audio.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="HF checkpoint dir → artifacts dir (needs the [export] extra)")
    e.add_argument("src", help="local Hugging Face Qwen2-Audio checkpoint directory")
    e.add_argument("out", help="artifacts directory to create")
    e.add_argument("--bits", type=int, default=16, help="decoder weights: 4 (GPTQ), 16 (fp16, default) or 32 (fp32)")
    e.add_argument(
        "--encoder-dtype",
        default="fp32",
        choices=["fp32", "fp16"],
        help="encoder ONNX the runtime uses by default (fp16 also keeps the verified fp32 file)",
    )
    e.add_argument("--force", action="store_true", help="replace an existing output directory")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    q = e.add_argument_group("GPTQ (--bits 4)")
    q.add_argument("--group-size", type=int, default=128, help="32, 64, 128 (default) or -1 (per channel)")
    q.add_argument(
        "--no-act-order", action="store_true", help="quantize columns in order (default: act-order, desc_act)"
    )
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric zero points (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric zero points")
    q.add_argument("--damp", type=float, default=0.01, help="dampening, fraction of mean diag(H) (default 0.01)")
    q.add_argument(
        "--calibration",
        default=None,
        help="directory of audio files (+ prompts.txt, NAME.txt transcripts); default: built-in synthetic set",
    )
    q.add_argument("--num-samples", type=int, default=128, help="calibration prompts (default 128)")
    q.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    q.add_argument(
        "--calibration-mode",
        default="audio",
        choices=["audio", "text"],
        help="audio (default): prompts with audio embeddings; text: the same prompts without audio",
    )
    q.add_argument(
        "--lm-head",
        default="fp16",
        choices=["fp16", "int8"],
        help="int8 adds a weight-only per-channel head in a side file only this runtime reads",
    )
    q.add_argument(
        "--hf-checkpoint", default=None, help="also write a full Qwen2-Audio GPTQ checkpoint here (vLLM layout)"
    )
    q.add_argument(
        "--resume", action="store_true", help="continue an interrupted 4-bit export from its last finished layer"
    )
    q.add_argument("--threads", type=int, default=None, help="torch threads (fixed for reproducible/resumable GPTQ)")
    q.add_argument(
        "--quant-device", default="cpu", help="device for GPTQ (cpu, cuda): one decoder layer lives there at a time"
    )

    r = sub.add_parser("run", help="answer one user turn (audio and/or text) and stream the text")
    r.add_argument("artifacts")
    r.add_argument("--audio", default=None, help="audio file (wav/flac/ogg/mp3/…, any rate); > 30 s is split")
    r.add_argument("--json", action="store_true", help="print one JSON object {text, token_ids, timings, …}")
    _add_generation_args(r)
    _add_runtime_args(r)

    st = sub.add_parser("stream", help="feed an audio file in chunks as a live stream (VAD endpointing or --no-vad)")
    st.add_argument("artifacts")
    src = st.add_mutually_exclusive_group(required=True)
    src.add_argument("--audio", help="audio file fed chunk by chunk")
    src.add_argument("--mic", action="store_true", help="live microphone input (needs the sounddevice package)")
    st.add_argument("--chunk-ms", type=int, default=100)
    st.add_argument("--realtime", action="store_true", help="feed at real-time pace")
    st.add_argument("--no-vad", action="store_true", help="no endpointing: end() after the last chunk")
    st.add_argument("--vad-threshold", type=float, default=0.5, help="silero-vad speech probability (default 0.5)")
    st.add_argument("--min-silence-ms", type=int, default=500, help="silence that ends an utterance (default 500)")
    st.add_argument(
        "--speech-pad-ms", type=int, default=100, help="audio kept on each side of the speech (default 100)"
    )
    st.add_argument(
        "--max-speech-s", type=float, default=30.0, help="forced endpoint after this much speech (default 30)"
    )
    st.add_argument(
        "--stream-mode",
        default="exact",
        choices=["exact", "chunked"],
        help="exact (default): output equals the offline run; chunked: block-wise encoder, each finished "
        "block prefilled while the person speaks (changes the output: check it with compare --chunked)",
    )
    st.add_argument(
        "--chunk-seconds", type=float, default=3.0, help="chunked mode block length (multiple of 0.04 s, default 3)"
    )
    st.add_argument(
        "--lookahead-seconds",
        type=float,
        default=2.0,
        help="chunked mode: audio after each block its tokens also attend to (default 2; a block is "
        "prefilled that long after it ends)",
    )
    st.add_argument(
        "--barge-in",
        action="store_true",
        help="answer on a worker thread; speech detected during an answer cancels it (VAD mode)",
    )
    st.add_argument(
        "--no-speculation", action="store_true", help="do not encode/prefill in the endpointing silence window"
    )
    st.add_argument(
        "--context-policy",
        default="drop_oldest",
        choices=["drop_oldest", "error"],
        help="when a turn does not fit in --max-context: drop the oldest exchanges (default) or stop with an error",
    )
    st.add_argument("--json", action="store_true", help="one JSON object per turn, with endpoint/first-token timings")
    _add_generation_args(st)
    _add_runtime_args(st)

    c = sub.add_parser("compare", help="quality of B vs reference A (artifacts dirs or HF checkpoints) on audio files")
    c.add_argument("a", help="reference: artifacts dir or Hugging Face checkpoint")
    c.add_argument(
        "b",
        nargs="?",
        default=None,
        help="candidate: artifacts dir or Hugging Face checkpoint (default: A again, with --chunked)",
    )
    c.add_argument(
        "--chunked",
        type=float,
        default=None,
        metavar="SECONDS",
        help="run the candidate in the chunked stream mode with SECONDS blocks (e.g. compare ART --chunked 2)",
    )
    c.add_argument(
        "--lookahead-seconds",
        type=float,
        default=None,
        help="with --chunked: the chunked mode's look-ahead per block (default 2, as stream)",
    )
    c.add_argument("--audio", action="append", default=None, help="audio file (repeat for several)")
    c.add_argument("--prompt", default="What does the person say?")
    c.add_argument("--new-tokens", type=int, default=32, help="continuation length decoded by A and teacher-forced")
    c.add_argument("--json", action="store_true")
    w = c.add_argument_group(
        "WER (needs reference transcripts)",
        "Each side also transcribes every file (greedy, eval's instruction); the report adds both "
        "WERs and the relative change (WER_B - WER_A) / WER_A.",
    )
    w.add_argument(
        "--transcripts",
        default=None,
        metavar="FILE_OR_DIR",
        help="transcripts of the --audio files: a file of `NAME TEXT` lines (LibriSpeech .trans.txt format; "
        "NAME = audio file name without extension) or a directory of NAME.txt / *.trans.txt files",
    )
    w.add_argument(
        "--librispeech",
        default=None,
        metavar="DIR",
        help="LibriSpeech-format dir (*/*/*.flac + *.trans.txt): its utterances replace --audio",
    )
    w.add_argument("--limit", type=int, default=None, help="first N LibriSpeech utterances (sorted by id)")
    w.add_argument(
        "--instruction",
        default=None,
        help="transcription instruction (default: eval's 'Recognize the speech and give me the transcription.')",
    )
    w.add_argument("--max-new-tokens", type=int, default=256, help="transcription length limit (default 256)")

    v = sub.add_parser("eval", help="LibriSpeech WER of an artifacts dir (needs the [export] extra)")
    v.add_argument("artifacts")
    v.add_argument("--librispeech", required=True, help="LibriSpeech-format dir (*/*/*.flac + *.trans.txt)")
    v.add_argument("--limit", type=int, default=None)
    v.add_argument("--instruction", default=None, help="default: 'Recognize the speech and give me the transcription.'")
    v.add_argument("--out", default=None, help="per-utterance JSONL (default: eval-results.jsonl)")
    v.add_argument("--max-new-tokens", type=int, default=256)
    v.add_argument("--json", action="store_true")
    _add_runtime_args(v)

    b = sub.add_parser(
        "bench",
        help="stage latencies, tokens/s, memory and roofline, side by side with transformers (and llama.cpp)",
        description="Benchmark our runtime stage by stage against transformers (and llama.cpp when built) on "
        "the same weights and inputs; greedy outputs are checked to agree before anything is timed.",
    )
    from .benchmark.options import add_bench_arguments

    add_bench_arguments(b)

    d = sub.add_parser("demo", help="build a tiny random checkpoint, export it, run a test signal (no weights needed)")
    d.add_argument(
        "--dir",
        "--keep",
        dest="dir",
        default=DEMO_DIR,
        metavar="DIR",
        help=f"where checkpoint/, artifacts/ and signal.wav go (default ./{DEMO_DIR}); a finished demo "
        "there is reused, a directory holding anything else is refused (--keep: the older name)",
    )
    d.add_argument(
        "--force", action="store_true", help="rebuild the checkpoint and artifacts of an existing demo directory"
    )
    d.add_argument("--seconds", type=float, default=5.0, help="length of the generated test signal")
    d.add_argument("--json", action="store_true")
    d.add_argument("--max-new-tokens", type=int, default=32)
    return parser


def _runtime_options(a: argparse.Namespace):
    from .runtime.pipeline import RuntimeOptions

    # --dtype not given: None, which RuntimeOptions resolves by the device (pipeline.default_dtype), as for the API
    return RuntimeOptions(
        device=a.device,
        dtype=a.dtype,
        max_context=a.max_context,
        encoder_backend=a.encoder_backend,
        encoder_precision=a.encoder_precision,
        threads=a.threads,
        verify_hashes=not a.no_verify,
        w4_kernel=a.w4_kernel,
        w4_tune=not a.no_w4_tune,
        fuse=not a.no_fuse,
        embeddings=a.embeddings,
        kv_cache=a.kv_cache,
        lm_head=a.lm_head,
    )


def _sampling_flags(a: argparse.Namespace) -> list[str]:
    """The sampling flags given; refused with --greedy (checked before any loading)."""
    flags = [
        f for f, v in (("--temperature", a.temperature), ("--top-k", a.top_k), ("--top-p", a.top_p)) if v is not None
    ]
    if a.greedy and flags:
        raise OptionsError(
            f"--greedy picks the most likely token, so {', '.join(flags)} would have no "
            "effect: drop --greedy to sample, or drop the sampling flags"
        )
    return flags


def _sampling(pipeline, a: argparse.Namespace):
    """The generation config's options (Pipeline.default_sampling) with the flags given on top: --greedy forces
    argmax; --temperature/--top-k/--top-p force sampling (with the config's values for the others)."""
    sampling_flags = _sampling_flags(a)
    over = dict(
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        repetition_penalty=a.repetition_penalty,
        seed=a.seed,
        ignore_eos=a.ignore_eos or None,
    )
    if a.greedy:
        over["greedy"] = True
    elif sampling_flags:
        over["greedy"] = False
    return pipeline.default_sampling(**over)


def _run_turn(pipeline, audio, a: argparse.Namespace) -> dict:
    if audio is None and not a.prompt:
        raise OptionsError("give --audio FILE and/or --prompt TEXT")
    sampling = _sampling(pipeline, a)
    stream = None if a.json else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    result = pipeline.run(audio, a.prompt, sampling=sampling, on_text=stream)
    if a.json:
        # which kernel/encoder paths ran, self-check verdicts included (Pipeline.active_paths)
        print(json.dumps({**result.to_json(), "paths": pipeline.active_paths()}, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        if result.finish_reason == "context_full":
            print("warning: generation stopped because the KV cache is full (raise --max-context)", file=sys.stderr)
    return result.to_json()


def cmd_export(a: argparse.Namespace) -> int:
    try:
        from .export.package import ExportOptions, export_checkpoint
    except ImportError as e:
        raise OptionsError(
            f"export needs the [export] extra ({e.name} is missing): pip install 'qwen-audio-edge[export]'"
        ) from e
    from .export.calibrate import CalibrationOptions
    from .export.gptq import GPTQConfig

    gptq = GPTQConfig(group_size=a.group_size, act_order=not a.no_act_order, sym=a.sym, damp=a.damp)
    calib = CalibrationOptions(
        directory=Path(a.calibration) if a.calibration else None,
        num_samples=a.num_samples,
        seed=a.seed,
        mode=a.calibration_mode,
    )
    opts = ExportOptions(
        bits=a.bits,
        encoder_dtype=a.encoder_dtype,
        force=a.force,
        progress=not a.quiet,
        gptq=gptq,
        calibration=calib,
        lm_head=a.lm_head,
        resume=a.resume,
        threads=a.threads,
        quant_device=a.quant_device,
        hf_checkpoint=Path(a.hf_checkpoint) if a.hf_checkpoint else None,
    )
    manifest = export_checkpoint(a.src, a.out, opts)
    v = manifest["encoder"]["verification"]
    q = manifest["decoder"].get("quantization", {}).get("eval_vs_fp")
    if q:
        errs = ", ".join(f"{e:.3e}" for e in q["layer_rel_err"])
        print(
            f"W4 vs fp on {q['samples']} calibration prompts ({q['positions']} positions): top-1 agreement "
            f"{q['top1_agreement']:.4f}, mean KL {q['mean_kl']:.3e}; hidden-state rel. error per layer: {errs}",
            file=sys.stderr,
        )
    print(
        f"wrote {a.out} ({len(manifest['files'])} files) in {manifest['export_seconds']} s; encoder vs transformers: "
        f"max abs err {v['fp32_max_abs_err_vs_transformers']:.2e} on {v['audio_tokens']} tokens",
        file=sys.stderr,
    )
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    from .runtime.pipeline import Pipeline

    _sampling_flags(a)
    pipeline = Pipeline.from_artifacts(a.artifacts, _runtime_options(a))
    _run_turn(pipeline, a.audio, a)
    return 0


def _stream_session(pipeline, a: argparse.Namespace, on_event=None):
    from .runtime.stream import StreamOptions, VadOptions

    options = StreamOptions(
        mode=a.stream_mode,
        chunk_seconds=a.chunk_seconds,
        lookahead_seconds=a.lookahead_seconds,
        speculate=not a.no_speculation,
        barge_in=a.barge_in,
        context_policy=a.context_policy,
    )
    on_text = None if a.json else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    vad = (
        None
        if a.no_vad
        else VadOptions(
            threshold=a.vad_threshold,
            min_silence_ms=a.min_silence_ms,
            speech_pad_ms=a.speech_pad_ms,
            max_speech_s=a.max_speech_s,
        )
    )
    return pipeline.stream(
        a.prompt, sampling=_sampling(pipeline, a), vad=vad, on_text=on_text, options=options, on_event=on_event
    )


def _print_events(events, a: argparse.Namespace) -> int:
    for ev in events:
        if a.json:
            print(json.dumps(ev.to_json(), ensure_ascii=False), flush=True)
        else:
            print(" [cancelled]" if ev.cancelled else "", flush=True)
    return len(events)


def cmd_stream(a: argparse.Namespace) -> int:
    import time

    from .runtime.audio import load_audio
    from .runtime.pipeline import Pipeline

    if a.chunk_ms < 1:
        raise OptionsError(f"--chunk-ms must be ≥ 1, got {a.chunk_ms}")
    _sampling_flags(a)
    if a.mic:
        return _stream_mic(a)
    pipeline = Pipeline.from_artifacts(a.artifacts, _runtime_options(a))
    wave = load_audio(a.audio, pipeline.mel.config.sampling_rate)
    session = _stream_session(pipeline, a)
    sr = pipeline.mel.config.sampling_rate
    step = max(1, sr * a.chunk_ms // 1000)
    turns = 0
    t0 = time.perf_counter()
    for i in range(0, len(wave), step):
        if a.realtime:
            time.sleep(max(0.0, i / sr - (time.perf_counter() - t0)))
        turns += _print_events(session.feed(wave[i : i + step]), a)
    last = session.end()
    turns += _print_events(session.wait() + ([last] if last is not None else []), a)
    if not turns:
        print(json.dumps({"text": "", "token_ids": [], "no_speech": True}) if a.json else "(no speech detected)")
    return 0


def _stream_mic(a: argparse.Namespace) -> int:
    """Live microphone → StreamSession with VAD endpointing; Ctrl-C stops."""
    import queue

    import numpy as np

    try:
        import sounddevice as sd
    except (ImportError, OSError) as e:
        raise OptionsError(
            f"--mic needs the sounddevice package and PortAudio ({e}); pip install sounddevice, or use --audio FILE"
        ) from e
    from .runtime.pipeline import Pipeline

    try:
        sd.query_devices(kind="input")
    except Exception as e:
        raise OptionsError(f"--mic: no audio input device is available ({e})") from e
    pipeline = Pipeline.from_artifacts(a.artifacts, _runtime_options(a))
    sr = pipeline.mel.config.sampling_rate
    chunks: queue.Queue = queue.Queue()
    session = _stream_session(pipeline, a)
    print("listening (Ctrl-C to stop)", file=sys.stderr)
    with sd.InputStream(
        samplerate=sr,
        channels=1,
        dtype="float32",
        blocksize=sr * a.chunk_ms // 1000,
        callback=lambda data, frames, t, status: chunks.put(data[:, 0].copy()),
    ):
        try:
            while True:
                pcm = [chunks.get()]
                while not chunks.empty():  # behind real time: coalesce everything queued into one feed
                    pcm.append(chunks.get_nowait())
                _print_events(session.feed(np.concatenate(pcm)), a)
        except KeyboardInterrupt:
            pass
    last = session.end()
    _print_events(session.wait() + ([last] if last is not None else []), a)
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    try:
        from .evaluation.compare import compare, format_table, open_model
    except ImportError as e:
        raise OptionsError(f"compare needs the [export] extra ({e.name} is missing)") from e
    if a.b is None and a.chunked is None:
        raise OptionsError(
            "compare needs a candidate B, or --chunked SECONDS to compare A's chunked stream mode with A"
        )
    if a.librispeech and (a.audio or a.transcripts):
        raise OptionsError(
            "--librispeech DIR brings its own audio files and transcripts: give it without --audio/--transcripts"
        )
    if not a.librispeech and not a.audio:
        raise OptionsError("compare needs --audio FILE (repeat for several) or --librispeech DIR")
    if a.limit is not None and not a.librispeech:
        raise OptionsError("--limit applies to --librispeech")
    transcripts = None
    if a.librispeech:
        from .evaluation.librispeech import read_librispeech

        utts = read_librispeech(a.librispeech, a.limit)
        files, transcripts = [u.audio for u in utts], [u.reference for u in utts]
    else:
        files = [Path(x) for x in a.audio]
        if a.transcripts:
            from .evaluation.librispeech import read_transcripts

            transcripts = read_transcripts(a.transcripts, files)
    ref = open_model(a.a)
    if a.lookahead_seconds is not None and a.chunked is None:
        raise OptionsError("--lookahead-seconds applies to --chunked")
    cand = open_model(a.b or a.a, chunk_seconds=a.chunked, lookahead_seconds=a.lookahead_seconds)
    report = compare(
        ref,
        cand,
        files,
        a.prompt,
        a.new_tokens,
        transcripts=transcripts,
        instruction=a.instruction,
        max_new_tokens=a.max_new_tokens,
        progress=True,
    )
    print(json.dumps(report) if a.json else format_table(report))
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    try:
        from .evaluation.librispeech import DEFAULT_INSTRUCTION, evaluate, read_librispeech
    except ImportError as e:
        raise OptionsError(f"eval needs the [export] extra ({e.name} is missing)") from e
    from .runtime.pipeline import Pipeline

    utts = read_librispeech(a.librispeech, a.limit)
    pipeline = Pipeline.from_artifacts(a.artifacts, _runtime_options(a))
    out = Path(a.out or "eval-results.jsonl")
    report = evaluate(pipeline, utts, a.instruction or DEFAULT_INSTRUCTION, out, a.max_new_tokens)
    report["per_utterance"] = str(out)
    if a.json:
        print(json.dumps(report))
    else:
        pub = report["published_wer_percent"]
        print(
            f"WER {report['wer_percent']:.2f}% on {report['utterances']} utterances (per-utterance results: {out})\n"
            f"published (Qwen2-Audio-7B-Instruct): test-clean {pub['test-clean']['original']} / test-other "
            f"{pub['test-other']['original']} (original), {pub['test-clean']['hf']} / {pub['test-other']['hf']} (HF)"
        )
    return 0


def _demo_state(root: Path) -> str:
    """What `demo` finds at `root`: "new" (absent or empty), "built" (a finished demo), "partial" (a demo build
    that stopped half-way) or "foreign" (anything else: never written over, so a typo cannot clobber data)."""
    if not root.exists():
        return "new"
    if not root.is_dir():
        return "foreign"
    marker = root / DEMO_MARKER
    if marker.is_file():
        try:
            return "built" if json.loads(marker.read_text()).get("complete") else "partial"
        except (ValueError, AttributeError):
            return "partial"
    return "new" if not any(root.iterdir()) else "foreign"


def _build_demo(root: Path) -> None:
    """A tiny random Qwen2-Audio checkpoint in root/checkpoint, exported to root/artifacts."""
    import shutil

    try:
        from .export.package import ExportOptions, export_checkpoint
        from .random_checkpoint import build_tiny_checkpoint
    except ImportError as e:
        raise OptionsError(
            f"demo needs the [export] extra ({e.name} is missing): pip install 'qwen-audio-edge[export]'"
        ) from e
    root.mkdir(parents=True, exist_ok=True)
    (root / DEMO_MARKER).write_text(json.dumps({"complete": False}))
    for name in ("checkpoint", "artifacts"):  # ours: the marker says this directory is a demo's
        if (root / name).is_dir():
            shutil.rmtree(root / name)
    print(f"[demo] building a tiny random Qwen2-Audio checkpoint in {root / 'checkpoint'}", file=sys.stderr)
    build_tiny_checkpoint(root / "checkpoint", "mha")
    print("[demo] exporting it (encoder → ONNX, verified against transformers)", file=sys.stderr)
    export_checkpoint(root / "checkpoint", root / "artifacts", ExportOptions(force=True, progress=False))
    (root / DEMO_MARKER).write_text(json.dumps({"complete": True}))


def cmd_bench(a: argparse.Namespace) -> int:
    from .benchmark.main import run_bench

    return run_bench(a)


def cmd_demo(a: argparse.Namespace) -> int:
    """Build (or reuse) the demo model in --dir, write signal.wav there and run it, so that README's next
    command (`qwen-audio-edge run qae-demo/artifacts --audio qae-demo/signal.wav`) finds what it needs."""
    root = Path(a.dir)
    state = _demo_state(root)
    if state == "foreign":
        what = "is not a directory" if root.exists() and not root.is_dir() else f"holds other files (no {DEMO_MARKER})"
        raise OptionsError(f"demo directory {root} {what}: give another --dir, or remove it")
    if state == "built" and not a.force:
        print(f"[demo] reusing the demo model in {root} (--force rebuilds it)", file=sys.stderr)
    else:
        _build_demo(root)
    import soundfile as sf

    from .export.synthetic_audio import speech_like_signal
    from .runtime.pipeline import Pipeline, RuntimeOptions

    wav = root / "signal.wav"
    sf.write(str(wav), speech_like_signal(a.seconds), 16000)  # rewritten every time: --seconds may differ
    print(
        f"[demo] running {wav} ({a.seconds} s) through the runtime (random weights: the text is noise)", file=sys.stderr
    )
    pipeline = Pipeline.from_artifacts(root / "artifacts", RuntimeOptions())
    run_args = argparse.Namespace(
        prompt="What does the person say?",
        json=a.json,
        max_new_tokens=a.max_new_tokens,
        greedy=True,
        temperature=None,
        top_k=None,
        top_p=None,
        repetition_penalty=None,
        seed=None,
        ignore_eos=True,
    )
    out = _run_turn(pipeline, str(wav), run_args)
    if not a.json:
        t = out["timings"]
        print("[demo] timings: " + ", ".join(f"{k}={v}" for k, v in t.items()), file=sys.stderr)
    print(f"[demo] next: qwen-audio-edge run {root / 'artifacts'} --audio {wav}", file=sys.stderr)
    return 0


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.formatwarning = _one_line_warning  # warnings print as one `warning: …` line, like errors
    parser = build_parser()
    a = parser.parse_args(argv)
    handlers = {
        "export": cmd_export,
        "run": cmd_run,
        "demo": cmd_demo,
        "compare": cmd_compare,
        "eval": cmd_eval,
        "stream": cmd_stream,
        "bench": cmd_bench,
    }
    try:
        return handlers[a.command](a)
    except QwenAudioEdgeError as e:
        if a.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if a.debug:
            raise
        print(f"error: internal error {type(e).__name__}: {e} (rerun with --debug for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
