"""Image updates on the host: bundles staged into new deployments beside the running one
(docs/updates.md, "On the host"). `Updates` is what rastosd's bus face and the hub agent call."""

from daemon.updates.model import PrepareDeployment as PrepareDeployment
from daemon.updates.model import StageAnswer as StageAnswer
from daemon.updates.model import carry_nothing as carry_nothing
from daemon.updates.service import Updates as Updates
