"""The shop's views and URLs. Imported by Django once configured."""

from __future__ import annotations

import threading

from django.db import connection, connections, transaction
from django.db.models import F
from django.http import HttpRequest, JsonResponse
from django.urls import path

from .models import Order, Product
from .state import STATE


def products(request: HttpRequest) -> JsonResponse:
    rows = list(Product.objects.order_by("id").values("id", "name", "stock")[:20])
    return JsonResponse({"products": rows})


def order(request: HttpRequest, product_id: int) -> JsonResponse:
    with transaction.atomic():
        product = Product.objects.select_for_update().get(pk=product_id)
        Product.objects.filter(pk=product.pk).update(stock=F("stock") - 1)
        created = Order.objects.create(product=product)
    return JsonResponse({"order": created.pk}, status=201)


def checkout(request: HttpRequest, product_id: int) -> JsonResponse:
    """Calls a slow payment provider inside the transaction: the row lock and the connection stay held."""
    hold = float(request.GET.get("hold", "5"))
    with transaction.atomic():
        product = Product.objects.select_for_update().get(pk=product_id)
        STATE.release_checkouts.wait(hold)  # waiting for the payment provider
        created = Order.objects.create(product=product)
    return JsonResponse({"order": created.pk}, status=201)


def _report_job() -> None:
    try:
        Order.objects.using("reports").count()
        list(Product.objects.using("reports").values_list("stock", flat=True))
        # The job is done and the thread waits for the next one. It runs outside the request cycle,
        # so nothing calls close_old_connections() for it, and `reports` has CONN_MAX_AGE=None:
        # its connection stays open, pinning a PgBouncer server connection in session pooling.
        STATE.stop_reports.wait()
    finally:
        connections["reports"].close()


def start_report(request: HttpRequest) -> JsonResponse:
    with STATE.lock:
        worker = threading.Thread(target=_report_job, name=f"report-{len(STATE.report_threads) + 1}", daemon=True)
        STATE.report_threads.append(worker)
    worker.start()
    return JsonResponse({"report": worker.name}, status=202)


def dashboard(request: HttpRequest) -> JsonResponse:
    """An expensive page: each request holds a server connection for a while."""
    seconds = min(float(request.GET.get("seconds", "0.4")), 5.0)
    with connection.cursor() as cursor:
        cursor.execute("SELECT (SELECT count(*) FROM demo_order), pg_sleep(%s)", [seconds])
        orders = cursor.fetchone()[0]
    return JsonResponse({"orders": orders})


urlpatterns = [
    path("products/", products),
    path("orders/<int:product_id>/", order),
    path("checkout/<int:product_id>/", checkout),
    path("reports/start/", start_report),
    path("dashboard/", dashboard),
]
