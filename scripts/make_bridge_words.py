"""Write src/reasonlab/tasks/data/bridge_words.txt: lowercase ASCII words of 4-10 letters that are ONE token in both
all-MiniLM-L6-v2's WordPiece vocabulary and SmolLM2's BPE vocabulary (as " word"), sorted. The `word-recall` task
reads this list; it was generated once with the embedded models:

    HF_HUB_OFFLINE=1 python scripts/make_bridge_words.py
"""

from pathlib import Path

from transformers import AutoTokenizer

from reasonlab.models import embedded

OUT = Path(__file__).resolve().parents[1] / "src" / "reasonlab" / "tasks" / "data" / "bridge_words.txt"


def main() -> None:
    src = set(AutoTokenizer.from_pretrained(str(embedded.minilm_dir())).get_vocab())
    tgt = AutoTokenizer.from_pretrained(str(embedded.smollm2_dir())).get_vocab()
    words = sorted(w for w in src if w.isascii() and w.isalpha() and w.islower() and 4 <= len(w) <= 10
                   and "\u0120" + w in tgt)  # \u0120 = the BPE vocabulary's leading-space marker
    OUT.write_text("\n".join(words) + "\n")
    print(f"wrote {len(words)} words to {OUT}")


if __name__ == "__main__":
    main()
