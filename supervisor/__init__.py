"""optimizerd's supervisor and optimizerctl: process supervision, control, metrics, systemd."""
