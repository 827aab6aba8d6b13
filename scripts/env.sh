# Source this file: puts the project's libtorch (PyTorch wheel in a cached venv) on the build and run paths.
# Installs it first if this machine does not have it yet (scripts/setup).
AUTOPIPE_CACHE="${AUTOPIPE_CACHE:-$HOME/.cache/autopipe}"
AUTOPIPE_VENV="$AUTOPIPE_CACHE/venv"
if [ ! -x "$AUTOPIPE_VENV/bin/python" ] || ! "$AUTOPIPE_VENV/bin/python" -c 'import torch' 2>/dev/null; then
  bash "$(dirname "${BASH_SOURCE[0]}")/setup" >&2 || return 1
fi
export VIRTUAL_ENV="$AUTOPIPE_VENV"
export PATH="$AUTOPIPE_VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
export LIBTORCH_BYPASS_VERSION_CHECK=0
_torch_lib="$("$AUTOPIPE_VENV/bin/python" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$_torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
unset _torch_lib
