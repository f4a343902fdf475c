"""The demo shop's tables. Imported by Django once the demo has configured it."""

from __future__ import annotations

from django.db import models


class Product(models.Model):
    name = models.CharField(max_length=80)
    stock = models.IntegerField(default=1000)

    class Meta:
        app_label = "demo"


class Order(models.Model):
    product = models.ForeignKey(Product, on_delete=models.CASCADE)
    quantity = models.IntegerField(default=1)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        app_label = "demo"
