"""The demo domain: tools acting on demo tables (so effects are visible and idempotent) and
three workflows: a customer refund, a travel booking and an infrastructure change agent."""
