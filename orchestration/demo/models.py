"""Demo tables. Every effect row carries the idempotency key of the step that made it, unique,
so a step re-executed after a crash cannot make the effect twice."""

from django.db import models


class Order(models.Model):
    order_id = models.CharField(max_length=20, unique=True)
    customer_email = models.EmailField()
    customer_name = models.CharField(max_length=100)
    item = models.CharField(max_length=200)
    amount = models.DecimalField(max_digits=10, decimal_places=2)
    status = models.CharField(max_length=20, default="delivered")

    def __str__(self) -> str:
        return self.order_id


class Refund(models.Model):
    order = models.ForeignKey(Order, on_delete=models.PROTECT, related_name="refunds")
    amount = models.DecimalField(max_digits=10, decimal_places=2)
    reason = models.TextField(blank=True)
    idempotency_key = models.CharField(max_length=80, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"refund {self.amount} on {self.order_id}"


class Email(models.Model):
    to = models.EmailField()
    subject = models.CharField(max_length=200)
    body = models.TextField()
    idempotency_key = models.CharField(max_length=80, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"email to {self.to}"


class Hotel(models.Model):
    name = models.CharField(max_length=100, unique=True)
    city = models.CharField(max_length=60)
    area = models.CharField(max_length=60)
    beach_km = models.FloatField()
    quiet = models.BooleanField()
    rating = models.FloatField()
    price_per_night = models.DecimalField(max_digits=8, decimal_places=2)
    rooms_left = models.PositiveIntegerField()

    def __str__(self) -> str:
        return self.name


class Booking(models.Model):
    hotel = models.ForeignKey(Hotel, on_delete=models.PROTECT, related_name="bookings")
    guest = models.CharField(max_length=100)
    check_in = models.DateField()
    nights = models.PositiveSmallIntegerField()
    idempotency_key = models.CharField(max_length=80, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.guest} at {self.hotel_id}"


class InfraChange(models.Model):
    kind = models.CharField(max_length=40)  # migration, delete_volume
    target = models.CharField(max_length=120)
    detail = models.TextField(blank=True)
    idempotency_key = models.CharField(max_length=80, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.kind} {self.target}"
