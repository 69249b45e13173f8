# Shared by the apache module's scripts (sourced, not executed).

alive() {
    # A zombie has exited; only its parent has not reaped it yet.
    [ -r "/proc/$1/stat" ] || return 1
    [ "$(sed 's/.*) //' "/proc/$1/stat" | cut -c1)" != Z ]
}

use_systemd() {
    case ${VIPFARM_M_INIT:-auto} in
        systemd) return 0 ;;
        direct) return 1 ;;
        auto) [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1 ;;
        *)
            echo "macro init must be auto, systemd or direct, not '$VIPFARM_M_INIT'" >&2
            exit 2
            ;;
    esac
}

# The master's PID when it runs, else nothing.
running_pid() {
    if [ -s "$VIPFARM_M_PIDFILE" ]; then
        pid=$(cat "$VIPFARM_M_PIDFILE")
        if alive "$pid"; then
            echo "$pid"
        fi
    fi
}

wait_gone() {
    while alive "$1"; do
        sleep 0.1
    done
}
