"""rastosd: the host daemon on the system bus as org.rastos.Daemon1."""
