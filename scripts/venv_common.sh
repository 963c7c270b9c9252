# Shared by scripts/setup.sh and scripts/setup_vllm.sh (sourced, not run):
#   prepare_venv DIR "$@"   reads the scripts' one option (--fresh: delete DIR first), creates DIR as a venv
#                           when it has none, and sets PIP=(DIR/bin/python -m pip ...) for the caller.
prepare_venv() {
  local dir=$1 script
  script=$(basename "$0")
  shift
  local fresh=0 arg
  for arg in "$@"; do
    case $arg in
      --fresh) fresh=1 ;;
      *) echo "$script: unknown option '$arg' (the only option is --fresh)" >&2; exit 2 ;;
    esac
  done
  if [[ $fresh == 1 ]]; then
    rm -rf "$dir"
  fi
  if [[ ! -x $dir/bin/python ]]; then
    "${PYTHON:-python3}" -m venv "$dir"
  fi
  PIP=("$dir/bin/python" -m pip --disable-pip-version-check)
}
