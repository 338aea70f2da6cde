"""State shared by the commands of one ``hpclaunch`` invocation: options and the lazily opened cluster."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..cluster import Cluster
    from ..config import Config


class AppContext:
    def __init__(self, *, debug: bool = False, **options: Any) -> None:
        self.debug = debug
        self.options = options
        self._cluster: Cluster | None = None
        self._config: Config | None = None

    def config(self) -> Config:
        """The config files (the site's and the user's), read once per invocation."""
        if self._config is None:
            from ..config import load

            self._config = load(self.options.get("config_path"))
        return self._config

    def cluster(self) -> Cluster:
        """The cluster of the chosen profile; its connection opens on first use and closes at exit."""
        if self._cluster is None:
            from ..cluster import Cluster

            o = self.options
            self._cluster = Cluster(
                self.config().profile(o.get("profile")),
                host=o.get("host"),
                user=o.get("user"),
                port=o.get("port"),
                template_dir=o.get("template_dir"),
                accept_new_host_key=o.get("accept_new_host_key"),
                ssh_client=o.get("transport"),
            )
        return self._cluster

    def close(self) -> None:
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None

    def global_argv(self) -> list[str]:
        """hpclaunch's own options that reach this same profile again (for a ProxyCommand that ssh
        runs later, from another environment: VS Code's has no HPCLAUNCH_* variables)."""
        o = self.options
        argv = ["-p", self.cluster().profile.name]
        config = self.config()
        if config.exists:
            argv += ["--config", str(config.path.absolute())]
        for flag, key in (("--host", "host"), ("--user", "user"), ("--port", "port")):
            if o.get(key) is not None:
                argv += [flag, str(o[key])]
        if o.get("accept_new_host_key"):
            argv.append("--accept-new-host-key")
        return argv
