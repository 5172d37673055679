# shellcheck shell=bash
# What the launch scripts share (sourced by launch/tpu_vm.sh and launch/prepare_dataflow.sh, not
# run): their --dry-run flag, and printing a command so that it can be pasted into a shell.

dry_run=0
# shellcheck disable=SC2034  # read by the scripts that source this file
extra=()

# Sets dry_run=1 when --dry-run is among the arguments and puts the others in extra.
split_dry_run() {
  local arg
  for arg in "$@"; do
    if [[ $arg == --dry-run ]]; then
      dry_run=1
    else
      extra+=("$arg")
    fi
  done
}

# Prints one argument as the shell would need it (only the value of --flag=value is quoted).
quote() {
  local arg=$1 prefix=""
  if [[ $arg =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    prefix=${BASH_REMATCH[1]}
    arg=${BASH_REMATCH[2]}
  fi
  if [[ -z $arg || $arg =~ [^A-Za-z0-9_./:=@,+%-] ]]; then
    arg="'${arg//\'/\'\\\'\'}'"
  fi
  printf '%s%s' "$prefix" "$arg"
}

# Runs a command, or prints it with --dry-run.
run() {
  if [[ $dry_run == 1 ]]; then
    local out=() a
    for a in "$@"; do
      out+=("$(quote "$a")")
    done
    echo "${out[*]}"
  else
    "$@"
  fi
}
