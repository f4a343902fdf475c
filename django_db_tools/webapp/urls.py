from __future__ import annotations

from django.conf import settings
from django.urls import include, path

from . import views

urlpatterns = [
    path("health/", views.health),
    path("query/", views.query),
    path("transaction/", views.hold_transaction),
    path("sleep/", views.sleep),
    path("pool/", views.pool_stats),
    path("error/", views.failing_query),
    path("iterate/", views.iterate),
    path("prepared/", views.prepared),
]
if settings.PROMETHEUS:
    urlpatterns.append(path("", include("django_prometheus.urls")))
