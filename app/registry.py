"""Every model module, imported so `Base.metadata` is complete (Alembic, tests)."""

from app.analysis import models as analysis_models
from app.audit import models as audit_models
from app.core.models import Base
from app.dashboard import models as dashboard_models
from app.health import models as health_models
from app.idempotency import models as idempotency_models
from app.instruments import models as instruments_models
from app.participants import models as participants_models
from app.reminders import models as reminders_models
from app.responses import models as responses_models
from app.retention import models as retention_models
from app.sites import models as sites_models
from app.studies import models as studies_models
from app.tokens import models as tokens_models
from app.webhooks import models as webhooks_models

__all__ = [
    "Base", "analysis_models", "audit_models", "dashboard_models", "health_models", "idempotency_models",
    "instruments_models", "participants_models", "reminders_models", "responses_models", "retention_models",
    "sites_models", "studies_models", "tokens_models", "webhooks_models",
]
