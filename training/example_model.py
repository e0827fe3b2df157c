"""A tiny Hugging Face model folder and CA-MER-style rows, built offline: the README's "Fit MoSE on
your model" example.

    python -m mosear_fast.training.example_model OUTDIR [--seed N]

writes

    OUTDIR/model/        a random 2-layer LlamaForCausalLM (save_pretrained: config.json,
                         model.safetensors) and its tokenizer (a word-level ``tokenizers`` model saved
                         through PreTrainedTokenizerFast: tokenizer.json, tokenizer_config.json)
    OUTDIR/train.jsonl   48 training rows {"id", "prompt", "answer"} (16 per CA-MER subset)
    OUTDIR/test.jsonl    24 test rows {"id", "prompt"}
    OUTDIR/labels.jsonl  the test rows' labels for mosear-eval {"id", "label", "audio_label",
                         "video_label", "subset"}

A prompt describes a face and a voice, each after its placeholder token::

    <video> the face is smiling <audio> the voice is sobbing . what emotion ?

The model's config names the placeholders the way audio-visual models' configs do
(``video_token_index``, ``audio_token_index``), so ``mosear-train`` gives those tokens the visual
and audio modality ids without the rows saying so. The truth follows the video cue (video-aligned),
the audio cue (audio-aligned) or both (consistent). The model is random: the example shows the
commands and files, not accuracy.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

EMOTION_CUES = {  # emotion: (visual cue, audio cue)
    "happy": ("smiling", "laughing"),
    "sad": ("tearful", "sobbing"),
    "angry": ("scowling", "shouting"),
    "neutral": ("expressionless", "monotone"),
    "worried": ("frowning", "sighing"),
    "surprise": ("wide-eyed", "gasping"),
}
SPECIAL = ("<pad>", "<s>", "</s>", "<unk>", "<video>", "<audio>")
PROMPT_WORDS = ("the", "face", "is", "voice", ".", "what", "emotion", "?")
TRAIN_PER_SUBSET, TEST_PER_SUBSET = 16, 8
SUBSETS = ("video_aligned", "audio_aligned", "consistent")


def vocabulary() -> list[str]:
    words = [*SPECIAL, *PROMPT_WORDS, *EMOTION_CUES]
    for visual, audio in EMOTION_CUES.values():
        words += [visual, audio]
    return words


def build_tokenizer(chat_template: str | None = None):
    """A word-level PreTrainedTokenizerFast over ``vocabulary()`` (whitespace-split, BOS in front)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", additional_special_tokens=["<video>", "<audio>"])
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def build_model(tokenizer, *, seed: int = 0, hidden: int = 64, layers: int = 2):
    """A random LlamaForCausalLM over the tokenizer's vocabulary whose config names the placeholders."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False, initializer_range=0.15,  # logits wide enough to fit answers
                         video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                         audio_token_index=tokenizer.convert_tokens_to_ids("<audio>"))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def prompt(visual_emotion: str, audio_emotion: str) -> str:
    visual, audio = EMOTION_CUES[visual_emotion][0], EMOTION_CUES[audio_emotion][1]
    return f"<video> the face is {visual} <audio> the voice is {audio} . what emotion ?"


def make_rows(n_per_subset: int, rng: random.Random, prefix: str) -> list[dict]:
    """``n_per_subset`` rows per CA-MER subset: {"id", "prompt", "label", "audio_label", "video_label", "subset"}."""
    emotions = list(EMOTION_CUES)
    rows = []
    for subset in SUBSETS:
        for _ in range(n_per_subset):
            video = rng.choice(emotions)
            audio = video if subset == "consistent" else rng.choice([e for e in emotions if e != video])
            truth = audio if subset == "audio_aligned" else video
            rows.append({"id": f"{prefix}-{len(rows):03d}", "prompt": prompt(video, audio), "label": truth,
                         "audio_label": audio, "video_label": video, "subset": subset})
    rng.shuffle(rows)
    return rows


def write_example(out: str | Path, *, seed: int = 0) -> dict[str, Path]:
    """Write the model folder and the three JSONL files into ``out``; returns their paths."""
    from mosear_fast.atomic import staged_folder

    from .jsonl import write_jsonl

    out = Path(out)
    rng = random.Random(seed)
    train, test = make_rows(TRAIN_PER_SUBSET, rng, "train"), make_rows(TEST_PER_SUBSET, rng, "test")
    with staged_folder(out / "model") as staging:
        tokenizer = build_tokenizer()
        tokenizer.save_pretrained(str(staging))
        build_model(tokenizer, seed=seed).save_pretrained(str(staging))
    paths = {"model": out / "model", "train": out / "train.jsonl", "test": out / "test.jsonl",
             "labels": out / "labels.jsonl"}
    write_jsonl(paths["train"], [{"id": r["id"], "prompt": r["prompt"], "answer": r["label"]} for r in train])
    write_jsonl(paths["test"], [{"id": r["id"], "prompt": r["prompt"]} for r in test])
    write_jsonl(paths["labels"], [{k: r[k] for k in ("id", "label", "audio_label", "video_label", "subset")}
                                  for r in test])
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mosear_fast.training.example_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, metavar="OUTDIR", help="folder to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the rows (default 0)")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        print(f"{parser.prog}: error: OUTDIR {args.out}: exists and is not a folder", file=sys.stderr)
        return 2
    try:
        paths = write_example(args.out, seed=args.seed)
    except OSError as e:
        print(f"{parser.prog}: error: OUTDIR {args.out}: cannot write ({e.strerror or e})", file=sys.stderr)
        return 2
    print(f"wrote {paths['model']}/ (model + tokenizer), {paths['train']}, {paths['test']}, {paths['labels']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
