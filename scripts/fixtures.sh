#!/usr/bin/env bash
# Build real ESP32-C3 app images with esptool, for the cross-check tests of otaforge-formats.
#
# Usage: scripts/fixtures.sh OUT_DIR
#
# Produces, in OUT_DIR:
#   app-v1.bin            small image (~70 KB), app version "1.0.0", SHA-256 appended
#   app-v2.bin            ~400 KB image (large const array in DROM), app version "2.0.0"
#   app-v1-nodigest.bin   like app-v1.bin but built with --dont-append-digest
#   app-v2-func.bin, app-v2-const.bin, app-v2-grown.bin
#                         app-v2.bin with one function changed, with one constant changed,
#                         and with its data grown by 12 KiB: realistic pairs for delta patches
#   *.info.txt            `esptool image-info` output for each image
#   *.elf                 the ELF each image was made from
#   image-info.argv       the esptool image-info command used, one argument per line (append a
#                         file name to run it on another image)
#   esptool-version.txt   the esptool version used
#
# What it needs, installed only when missing (Debian 12, as root or with sudo):
#   riscv64-unknown-elf-gcc  (apt: gcc-riscv64-unknown-elf)
#   python3 with venv        (apt: python3 python3-venv)
#   esptool 4.x or 5.x       (PyPI, into OUT_DIR/tools/venv; an esptool already on PATH is used
#                             when its version fits; ESPTOOL=cmd overrides the choice)
#
# Idempotent: when every output exists and was made by this same script with the same esptool,
# it returns at once.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi

mkdir -p "$1"
OUT_DIR="$(cd "$1" && pwd)"
SCRIPT_PATH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
TOOLS_DIR="$OUT_DIR/tools"
BUILD_DIR="$OUT_DIR/build"
STAMP="$OUT_DIR/.fixtures-stamp"
ESPTOOL_REQ='esptool>=4.7,<6'

log() { echo "fixtures: $*" >&2; }

# One run at a time per OUT_DIR (parallel test processes may call us together).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$OUT_DIR/.lock"
    flock 9
fi

as_root() {
    if [[ "$(id -u)" == 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        log "need root to run: $*"
        return 1
    fi
}

apt_install() {
    log "apt-get install $*"
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >&2; then
        log "install failed, running apt-get update and trying again"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >&2
    fi
}

# --- toolchain -------------------------------------------------------------------------------
if ! command -v riscv64-unknown-elf-gcc >/dev/null 2>&1; then
    apt_install gcc-riscv64-unknown-elf
fi
CC=riscv64-unknown-elf-gcc

# python3 makes the fixture data and runs esptool.
if ! command -v python3 >/dev/null 2>&1; then
    apt_install python3 python3-venv
fi

# --- esptool ---------------------------------------------------------------------------------
# Prints the major version of an esptool command, or nothing.
esptool_major() {
    local out
    out="$("$@" version 2>/dev/null)" || return 0
    # v4 prints "esptool.py v4.8.1" then "4.8.1"; v5 prints "esptool v5.6.0" then "5.6.0".
    printf '%s\n' "$out" | grep -Eo '^[0-9]+\.[0-9]+' | sed -n 1p | cut -d. -f1
}

version_fits() { [[ "${1:-}" == 4 || "${1:-}" == 5 ]]; }

ESPTOOL_CMD=()
if [[ -n "${ESPTOOL:-}" ]]; then
    read -r -a ESPTOOL_CMD <<<"$ESPTOOL"
else
    for candidate in esptool esptool.py; do
        if command -v "$candidate" >/dev/null 2>&1 && version_fits "$(esptool_major "$candidate")"; then
            ESPTOOL_CMD=("$candidate")
            break
        fi
    done
    if [[ ${#ESPTOOL_CMD[@]} -eq 0 ]]; then
        VENV="$TOOLS_DIR/venv"
        if [[ ! -x "$VENV/bin/esptool" && ! -x "$VENV/bin/esptool.py" ]]; then
            rm -rf "$VENV"
            if ! python3 -m venv "$VENV" >&2; then
                rm -rf "$VENV"
                apt_install python3-venv
                python3 -m venv "$VENV" >&2
            fi
            log "pip install $ESPTOOL_REQ"
            "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$ESPTOOL_REQ" >&2
        fi
        if [[ -x "$VENV/bin/esptool" ]]; then
            ESPTOOL_CMD=("$VENV/bin/esptool")
        else
            ESPTOOL_CMD=("$VENV/bin/esptool.py")
        fi
    fi
fi

ESPTOOL_MAJOR="$(esptool_major "${ESPTOOL_CMD[@]}")"
if ! version_fits "$ESPTOOL_MAJOR"; then
    log "esptool (${ESPTOOL_CMD[*]}) is not version 4 or 5"
    exit 1
fi
ESPTOOL_VERSION="$("${ESPTOOL_CMD[@]}" version 2>/dev/null | tail -n1)"

# v5 spells the commands with dashes and always prints the extended header; v4 uses
# underscores and needs `image_info --version 2` for the extended header and app description.
if [[ "$ESPTOOL_MAJOR" == 5 ]]; then
    IMAGE_INFO=(image-info)
else
    IMAGE_INFO=(image_info --version 2)
fi

OUTPUTS=(app-v1.bin app-v2.bin app-v1-nodigest.bin app-v1.info.txt app-v2.info.txt
    app-v1-nodigest.info.txt app-v1.elf app-v2.elf app-v1-nodigest.elf image-info.argv
    esptool-version.txt app-v2-func.bin app-v2-const.bin app-v2-grown.bin)
STAMP_VALUE="$(sha256sum "$SCRIPT_PATH" | cut -d' ' -f1) esptool $ESPTOOL_VERSION"

all_present() {
    local f
    for f in "${OUTPUTS[@]}"; do
        [[ -s "$OUT_DIR/$f" ]] || return 1
    done
}

if all_present && [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_VALUE" ]]; then
    log "up to date in $OUT_DIR (esptool $ESPTOOL_VERSION)"
    exit 0
fi

rm -f "$STAMP"
mkdir -p "$BUILD_DIR"

# --- sources ---------------------------------------------------------------------------------
cat >"$BUILD_DIR/app.c" <<'EOF'
/* A tiny ESP-IDF-shaped app: an esp_app_desc_t at DROM 0x3C000020, code in IROM. */
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

struct esp_app_desc {
    u32 magic_word;
    u32 secure_version;
    u32 reserv1[2];
    char version[32];
    char project_name[32];
    char time[16];
    char date[16];
    char idf_ver[32];
    u8 app_elf_sha256[32];
    u16 min_efuse_blk_rev_full;
    u16 max_efuse_blk_rev_full;
    u8 mmu_page_size;
    u8 reserv3[3];
    u32 reserv2[18];
};

__attribute__((section(".flash.appdesc"), used))
const struct esp_app_desc esp_app_desc = {
    .magic_word = 0xABCD5432,
    .secure_version = FIXTURE_SECURE_VERSION,
    .version = FIXTURE_VERSION,
    .project_name = "otaforge-fixture",
    .time = "12:34:56",
    .date = "Jan  2 2025",
    .idf_ver = "v5.1",
};

extern const u8 big_blob[];
extern const u8 big_blob_end[];

#ifndef FIXTURE_COUNTER
#define FIXTURE_COUNTER 0x1234567
#endif
u32 counter = FIXTURE_COUNTER;
volatile u32 sink;

__attribute__((section(".iram0.text"), noinline))
u32 mix(u32 x)
{
#ifdef FIXTURE_MIX_VARIANT
    return (x ^ (x >> 15)) * 2246822519u + counter;
#else
    return x * 2654435761u + counter;
#endif
}

__attribute__((section(".text.entry"), noreturn))
void fixture_entry(void)
{
    u32 acc = esp_app_desc.secure_version;
    for (const u8 *p = big_blob; p < big_blob_end; p++) {
        acc = mix(acc ^ *p);
    }
    sink = acc;
    for (;;) {
    }
}
EOF

cat >"$BUILD_DIR/blob.S" <<'EOF'
    .section .rodata.blob, "a"
    .globl big_blob
    .globl big_blob_end
    .balign 4
big_blob:
    .incbin "blob.bin"
    .balign 4
big_blob_end:
EOF

cat >"$BUILD_DIR/app.ld" <<'EOF'
ENTRY(fixture_entry)
SECTIONS
{
    .flash.appdesc 0x3C000020 : { KEEP(*(.flash.appdesc)) }
    .flash.rodata : ALIGN(16) { *(.rodata .rodata.* .srodata .srodata.*) KEEP(*(.rodata.blob)) }
    .iram0.text 0x40380000 : { *(.iram0.text) }
    .dram0.data 0x3FC88000 : { *(.data .data.* .sdata .sdata.*) }
    .dram0.bss (NOLOAD) : { *(.bss .bss.* .sbss .sbss.* COMMON) }
    .flash.text 0x42000020 : { KEEP(*(.text.entry)) *(.text .text.*) }
    /DISCARD/ : { *(.comment) *(.note .note.*) *(.eh_frame) }
}
EOF

# Deterministic pseudo-random bytes (xorshift32), so images are the same on every machine.
make_blob() {
    python3 - "$1" "$2" <<'EOF'
import sys
path, size = sys.argv[1], int(sys.argv[2])
x = 0x2545F491
out = bytearray(size)
for i in range(size):
    x ^= (x << 13) & 0xFFFFFFFF
    x ^= x >> 17
    x ^= (x << 5) & 0xFFFFFFFF
    out[i] = x & 0xFF
open(path, "wb").write(bytes(out))
EOF
}

# build NAME VERSION SECURE_VERSION BLOB_BYTES [extra elf2image args...]
build() {
    local name=$1 version=$2 secure=$3 blob_bytes=$4
    shift 4
    local dir="$BUILD_DIR/$name"
    mkdir -p "$dir"
    make_blob "$dir/blob.bin" "$blob_bytes"
    cp "$BUILD_DIR/blob.S" "$dir/blob.S"
    "$CC" -march=rv32imc -mabi=ilp32 -nostdlib -ffreestanding -O2 -msmall-data-limit=0 \
        -fno-pic -Wall -Werror ${FIXTURE_CFLAGS:-} \
        "-DFIXTURE_VERSION=\"$version\"" "-DFIXTURE_SECURE_VERSION=$secure" \
        -Wl,--no-relax -Wl,-T,"$BUILD_DIR/app.ld" -Wl,--build-id=none \
        -o "$dir/$name.elf" "$BUILD_DIR/app.c" -I"$dir" -x assembler-with-cpp "$dir/blob.S" \
        -Wa,-I"$dir"
    cp "$dir/$name.elf" "$OUT_DIR/$name.elf"
    log "elf2image $name ($version)"
    "${ESPTOOL_CMD[@]}" --chip esp32c3 elf2image -fm dio -fs 4MB -ff 80m \
        --elf-sha256-offset 0xb0 "$@" -o "$OUT_DIR/$name.bin" "$dir/$name.elf" >"$dir/elf2image.log" 2>&1 ||
        {
            cat "$dir/elf2image.log" >&2
            return 1
        }
    "${ESPTOOL_CMD[@]}" "${IMAGE_INFO[@]}" "$OUT_DIR/$name.bin" >"$OUT_DIR/$name.info.txt.tmp" 2>&1 ||
        {
            cat "$OUT_DIR/$name.info.txt.tmp" >&2
            return 1
        }
    mv "$OUT_DIR/$name.info.txt.tmp" "$OUT_DIR/$name.info.txt"
}

build app-v1 "1.0.0" 1 4096
build app-v2 "2.0.0" 2 $((380 * 1024)) --min-rev-full 3 --max-rev-full 199
build app-v1-nodigest "1.0.0" 1 4096 --dont-append-digest
FIXTURE_CFLAGS=-DFIXTURE_MIX_VARIANT build app-v2-func "2.0.0" 2 $((380 * 1024)) --min-rev-full 3 --max-rev-full 199
FIXTURE_CFLAGS=-DFIXTURE_COUNTER=0x7654321 build app-v2-const "2.0.0" 2 $((380 * 1024)) --min-rev-full 3 --max-rev-full 199
build app-v2-grown "2.1.0" 2 $((392 * 1024)) --min-rev-full 3 --max-rev-full 199

printf '%s\n' "${ESPTOOL_CMD[@]}" "${IMAGE_INFO[@]}" >"$OUT_DIR/image-info.argv"
echo "$ESPTOOL_VERSION" >"$OUT_DIR/esptool-version.txt"
echo "$STAMP_VALUE" >"$STAMP"
log "built in $OUT_DIR with esptool $ESPTOOL_VERSION (${ESPTOOL_CMD[*]})"
ls -l "$OUT_DIR"/*.bin >&2
