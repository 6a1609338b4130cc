"""The local stack: real emulators and servers on loopback, supervised by PID."""
