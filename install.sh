#!/usr/bin/env bash
# Install the onemarket drivers onto an OpenNebula front-end (system layout) or self-contained
# under a ONE_LOCATION. Replaces the stock one_market MAD, the market remotes of the four
# drivers and the datastore downloader.sh, keeping every replaced original beside it as
# <name>.orig; -r removes exactly what was installed and puts the originals back.
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DRIVERS=(http s3 one linuxcontainers)
ACTIONS=(import delete monitor)
MARKER=onemarket

usage() {
  cat <<EOF
Usage: $0 [-d DIR] [-u USER] [-g GROUP] [-P PYTHON] [-r] [-h]

  (no option)  install into the system layout: /usr/lib/one/mads, /var/lib/one/remotes,
               a private virtualenv in /usr/lib/one/market-python, one-market in /usr/bin
  -d DIR       install self-contained under a ONE_LOCATION: DIR/lib/mads, DIR/var/remotes,
               the virtualenv in DIR/lib/market-python, one-market in DIR/bin
  -u USER      owner of the installed files (default: oneadmin when that user exists)
  -g GROUP     group of the installed files (default: oneadmin when that group exists)
  -P PYTHON    use this interpreter (which must already import onemarket, e.g. a development
               venv) instead of creating the private virtualenv
  -r           remove what a previous install put there and restore the replaced originals
  -h           this help

Run it again after an OpenNebula package upgrade: the upgrade restores the stock files.
EOF
}

DIR="" OWNER="" GROUP="" PYTHON="" REMOVE=0
while getopts "d:u:g:P:rh" opt; do
  case "$opt" in
    d) DIR=$OPTARG ;;
    u) OWNER=$OPTARG ;;
    g) GROUP=$OPTARG ;;
    P) PYTHON=$OPTARG ;;
    r) REMOVE=1 ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -eq 0 ] || { usage >&2; exit 2; }

if [ -n "$DIR" ]; then
  mkdir -p "$DIR"
  DIR=$(cd "$DIR" && pwd)
  MADS=$DIR/lib/mads
  REMOTES=$DIR/var/remotes
  VENV=$DIR/lib/market-python
  BIN=$DIR/bin
  MANIFEST=$DIR/lib/onemarket.manifest
else
  MADS=/usr/lib/one/mads
  REMOTES=/var/lib/one/remotes
  VENV=/usr/lib/one/market-python
  BIN=/usr/bin
  MANIFEST=/usr/lib/one/onemarket.manifest
fi

say() { echo "install.sh: $*"; }
die() { echo "install.sh: error: $*" >&2; exit 1; }

# --- removal ------------------------------------------------------------------------------
if [ "$REMOVE" = 1 ]; then
  [ -f "$MANIFEST" ] || die "nothing to remove: no manifest at $MANIFEST"
  dirs=()
  while IFS=' ' read -r kind path; do
    case "$kind" in
      file)
        if [ -f "$path" ] && ! grep -q "$MARKER" "$path" 2>/dev/null; then
          rm -f "$path.orig"  # an upgrade already put a newer stock file back: keep that one
        else
          rm -f "$path"
          if [ -f "$path.orig" ]; then mv -f "$path.orig" "$path"; fi
        fi
        ;;
      venv) [ -d "$path" ] && rm -rf "$path" ;;
      dir) dirs+=("$path") ;;
    esac
  done <"$MANIFEST"
  rm -f "$MANIFEST"
  # folders install.sh created, deepest first, unless something else was put in them since
  if [ ${#dirs[@]} -gt 0 ]; then
    printf '%s\n' "${dirs[@]}" | sort -r | while read -r d; do rmdir "$d" 2>/dev/null || true; done
  fi
  say "removed; the stock files that were replaced are back in place"
  exit 0
fi

declare -a ENTRIES=()

# make_dir DIR: mkdir -p, recording each folder it creates so that -r removes it again
make_dir() {
  local d=$1 missing=()
  while [ ! -d "$d" ]; do missing+=("$d"); d=$(dirname "$d"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  mkdir -p "$1" || die "cannot create $1"
  for d in "${missing[@]}"; do ENTRIES+=("dir $d"); done
}

# --- interpreter --------------------------------------------------------------------------
if [ -n "$PYTHON" ]; then
  command -v "$PYTHON" >/dev/null || die "interpreter $PYTHON not found"
  PY=$(command -v "$PYTHON")
  # absolute, but not through symlinks: a venv's python is a link that must stay one
  PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
else
  command -v python3 >/dev/null || die "python3 is required (apt-get install python3 python3-venv)"
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "Python >= 3.11 is required, found $(python3 --version 2>&1)"
  if [ ! -x "$VENV/bin/python" ]; then
    make_dir "$(dirname "$VENV")"
    python3 -m venv "$VENV" || die "cannot create a virtualenv (apt-get install python3-venv)"
  fi
  say "installing the library and its dependencies into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "$SRC" \
    || die "pip install into $VENV failed"
  PY=$VENV/bin/python
  ENTRIES+=("venv $VENV")
fi
# the library's folder, which the MAD launcher checks before it starts Python (a removed venv
# then answers oned's INIT with a reason instead of a silent exit)
PKG_DIR=$("$PY" -I -c 'import os, onemarket; print(os.path.dirname(onemarket.__file__))' 2>/dev/null) \
  || die "$PY cannot import onemarket (with -P: pip install -e $SRC into it first)"

# --- files --------------------------------------------------------------------------------
# install_file SRC DEST MODE: keep a foreign original as DEST.orig once, then write ours with
# the chosen interpreter in its shebang.
install_file() {
  local src=$1 dest=$2 mode=$3 tmp
  [ -f "$src" ] || die "missing source file $src"
  make_dir "$(dirname "$dest")"
  tmp=$(mktemp "$dest.XXXXXX")
  if head -n1 "$src" | grep -q '^#!.*python'; then
    { echo "#!$PY"; tail -n +2 "$src"; } >"$tmp" || { rm -f "$tmp"; die "cannot write $dest"; }
  else
    sed -e "s|@PYTHON@|$PY|g" -e "s|@PACKAGE_DIR@|$PKG_DIR|g" "$src" >"$tmp" \
      || { rm -f "$tmp"; die "cannot write $dest"; }
  fi
  chmod "$mode" "$tmp"
  # an unmarked file here is stock: the original, or a newer one an OpenNebula upgrade put back
  if [ -e "$dest" ] && ! grep -q "$MARKER" "$dest" 2>/dev/null; then
    mv -f "$dest" "$dest.orig"
    say "kept the stock $dest as $dest.orig"
  fi
  mv -f "$tmp" "$dest"
  ENTRIES+=("file $dest")
}

install_file "$SRC/drivers/one_market" "$MADS/one_market" 0755
for d in "${DRIVERS[@]}"; do
  for a in "${ACTIONS[@]}"; do
    install_file "$SRC/remotes/market/$d/$a" "$REMOTES/market/$d/$a" 0755
  done
done

wrapper() {  # wrapper MODULE: a shell script running a module of ours with our interpreter
  # -I: the caller's working directory and PYTHON* variables never change what is imported
  printf '#!/bin/sh\n# %s: installed by install.sh, runs %s\nexec "%s" -I -m %s "$@"\n' \
    "$MARKER" "$1" "$PY" "$1"
}
downloader_wrapper() {
  # remotes are copied to hosts by onehost sync, where our interpreter may not exist: there the
  # stock script kept beside this one does the work, as before the install
  cat <<EOF
#!/bin/sh
# $MARKER: installed by install.sh; reads s3:// and lxd:// sources itself, hands others to downloader.sh.orig
if [ -x "$PY" ]; then
  # the original beside this script, wherever it was run from (by hand, no ONE_LOCATION)
  ONE_MARKET_STOCK_DOWNLOADER=\${ONE_MARKET_STOCK_DOWNLOADER:-\$(CDPATH= cd -P -- "\$(dirname -- "\$0")" >/dev/null && pwd)/downloader.sh.orig}
  export ONE_MARKET_STOCK_DOWNLOADER
  exec "$PY" -I -m onemarket.downloader "\$@"
fi
exec "\$(dirname "\$0")/downloader.sh.orig" "\$@"
EOF
}
tmpdir=$(mktemp -d)
trap 'rm -rf "$tmpdir"' EXIT
downloader_wrapper >"$tmpdir/downloader.sh"
install_file "$tmpdir/downloader.sh" "$REMOTES/datastore/downloader.sh" 0755
wrapper onemarket.cli >"$tmpdir/one-market"
install_file "$tmpdir/one-market" "$BIN/one-market" 0755

# --- owners -------------------------------------------------------------------------------
if [ -z "$OWNER" ] && id oneadmin >/dev/null 2>&1; then OWNER=oneadmin; fi
if [ -z "$GROUP" ] && getent group oneadmin >/dev/null 2>&1; then GROUP=oneadmin; fi
if [ -n "$OWNER$GROUP" ]; then
  for e in "${ENTRIES[@]}"; do
    path=${e#* }
    [ "${e%% *}" = file ] && { chown "${OWNER}${GROUP:+:$GROUP}" "$path" || die "chown $path failed"; }
  done
  for d in "${DRIVERS[@]}"; do chown "${OWNER}${GROUP:+:$GROUP}" "$REMOTES/market/$d"; done
fi

# --- manifest (merged with a previous install, so -r after two installs removes all) -------
make_dir "$(dirname "$MANIFEST")"
{ [ -f "$MANIFEST" ] && cat "$MANIFEST"; printf '%s\n' "${ENTRIES[@]}"; } | sort -u >"$MANIFEST.new"
mv -f "$MANIFEST.new" "$MANIFEST"

KEPT=""
[ -f "$REMOTES/datastore/downloader.sh.orig" ] && KEPT=" (the stock one kept as downloader.sh.orig)"
cat <<EOF
install.sh: installed onemarket (interpreter $PY)
  MAD:        $MADS/one_market
  remotes:    $REMOTES/market/{$(IFS=,; echo "${DRIVERS[*]}")}
  downloader: $REMOTES/datastore/downloader.sh$KEPT
  command:    $BIN/one-market

oned.conf needs no change when it already uses the stock driver. Otherwise add:

MARKET_MAD = [
    EXECUTABLE = "one_market",
    ARGUMENTS  = "-t 15 -m http,s3,one,linuxcontainers -w 7200"
]
MARKET_MAD_CONF = [ NAME = "one", SUNSTONE_NAME = "OpenNebula.org Marketplace",
    REQUIRED_ATTRS = "", APP_ACTIONS = "monitor", PUBLIC = "yes" ]
MARKET_MAD_CONF = [ NAME = "http", SUNSTONE_NAME = "HTTP server",
    REQUIRED_ATTRS = "BASE_URL,PUBLIC_DIR", APP_ACTIONS = "create, delete, monitor" ]
MARKET_MAD_CONF = [ NAME = "s3", SUNSTONE_NAME = "Amazon S3",
    REQUIRED_ATTRS = "ACCESS_KEY_ID,SECRET_ACCESS_KEY,REGION,BUCKET",
    APP_ACTIONS = "create, delete, monitor" ]
MARKET_MAD_CONF = [ NAME = "linuxcontainers", SUNSTONE_NAME = "LinuxContainers.org",
    REQUIRED_ATTRS = "", APP_ACTIONS = "monitor", PUBLIC = "yes" ]

Note: an OpenNebula package upgrade restores the stock files: run install.sh again after it.
EOF
