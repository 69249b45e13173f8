# Shared by the generic module's scripts (sourced, not executed).

alive() {
    # A zombie has exited; only its parent has not reaped it yet.
    [ -r "/proc/$1/stat" ] || return 1
    [ "$(sed 's/.*) //' "/proc/$1/stat" | cut -c1)" != Z ]
}
