# Source on the lent GPU machine, in the checkout (see docs/RESULTS.md, "GPU runs"): installs the carried wheels
# (.carry/whl: gguf, and the transformers / peft versions of this checkout's lock) once per machine and points
# bayeslora at the carried benchmark data (.carry/data) and the re-assembled default model (/root/model).
[ -f /tmp/site/.done ] || { python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    .carry/whl/*.whl && touch /tmp/site/.done; } || return 1
export PYTHONPATH=/tmp/site:$PWD/src BAYESLORA_DATA=$PWD/.carry/data BAYESLORA_CACHE=/root/cache PYTHONUNBUFFERED=1
export SMOLLM2=/root/model/SmolLM2-135M-Instruct.Q4_1.gguf
