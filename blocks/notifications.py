"""E-mail over SMTP as a Prefect notification block.

Prefect's own notification blocks (Slack, Microsoft Teams, Discord, Opsgenie, PagerDuty,
custom webhook, Sendgrid, ...) all speak HTTP; none sends through a plain SMTP server. This
one does, so an automation's ``SendNotification`` action can mail an operator. The Prefect
*server* sends automation notifications, so it needs pgbackflow installed to know this
block type (the ``prefect.collections`` entry point makes the server import it).
"""

from __future__ import annotations

import email.policy
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import ClassVar, Literal

import anyio.to_thread
from prefect.blocks.abstract import NotificationBlock, NotificationError
from pydantic import Field, HttpUrl, SecretStr

_POLICY = email.policy.SMTP.clone(max_line_length=998)


class SmtpEmail(NotificationBlock):
    """Send notifications as e-mail through an SMTP server.

    Attributes:
        smtp_server: Host name of the SMTP server.
        smtp_port: Its port (587 for STARTTLS, 465 for SSL, 25 plain).
        security: ``starttls`` (default), ``ssl``, or ``none`` (plain text: loopback or a
            trusted relay only).
        username: Login, if the server needs one.
        password: Its password.
        from_address: The sender address.
        to: Recipient addresses.
        timeout_s: Seconds to wait for the server.

    Example:
        ```python
        from pgbackflow.blocks.notifications import SmtpEmail

        SmtpEmail(smtp_server="mail.example.com", from_address="backups@example.com",
                  to=["dba@example.com"], username="backups", password="...").save("ops-mail")
        ```
    """

    _block_type_name: ClassVar[str] = "pgbackflow SMTP Email"
    _block_type_slug: ClassVar[str] = "pgbackflow-smtp-email"
    _description: ClassVar[str] = (
        "Sends notifications (automation alerts) as e-mail through an SMTP server."
    )
    _documentation_url: ClassVar[HttpUrl] = HttpUrl(
        "https://github.com/pgbackflow/pgbackflow/blob/main/docs/BLOCKS.md"
    )
    _code_example: ClassVar[str] = """
```python
from pgbackflow.blocks.notifications import SmtpEmail

smtp_email = SmtpEmail.load("BLOCK_NAME")
smtp_email.notify("body", subject="subject")
```
"""

    smtp_server: str = Field(description="Host name of the SMTP server.")
    smtp_port: int = Field(default=587, ge=1, le=65535, description="Port of the SMTP server.")
    security: Literal["starttls", "ssl", "none"] = Field(
        default="starttls",
        description="starttls, ssl, or none (plain text: only for loopback or a trusted relay).",
    )
    username: str | None = Field(default=None, description="Login, if the server needs one.")
    password: SecretStr | None = Field(default=None, description="Password of the login.")
    from_address: str = Field(description="Sender address.")
    to: list[str] = Field(min_length=1, description="Recipient addresses.")
    timeout_s: float = Field(default=30.0, gt=0, description="Seconds to wait for the server.")

    async def notify(self, body: str, subject: str | None = None) -> None:
        """Send ``body`` as a plain-text mail (raises only inside ``raise_on_failure``)."""
        message = self.message(body, subject)
        try:
            await anyio.to_thread.run_sync(self._send, message)
        except (OSError, smtplib.SMTPException) as exc:
            # The error names the server and what it said, never the password.
            self.logger.error("mail to %s not sent: %s", ", ".join(self.to), exc)
            if self._raise_on_failure:
                raise NotificationError(log=f"SMTP {self.smtp_server}: {exc}") from None

    def message(self, body: str, subject: str | None) -> EmailMessage:
        """The mail as sent."""
        # Headers up to RFC 5322's 998 characters stay on one line: at the default 78,
        # Python folds a long subject whole onto a continuation line, which readers then
        # show with a leading space.
        message = EmailMessage(policy=_POLICY)
        message["From"] = self.from_address
        message["To"] = ", ".join(self.to)
        message["Subject"] = subject or "pgbackflow notification"
        message["Date"] = formatdate(localtime=False)
        message["Message-ID"] = make_msgid(domain="pgbackflow")
        message.set_content(body)
        return message

    def _send(self, message: EmailMessage) -> None:
        context = ssl.create_default_context()
        smtp: smtplib.SMTP
        if self.security == "ssl":
            smtp = smtplib.SMTP_SSL(self.smtp_server, self.smtp_port, timeout=self.timeout_s,
                                    context=context)
        else:
            smtp = smtplib.SMTP(self.smtp_server, self.smtp_port, timeout=self.timeout_s)
        with smtp:
            if self.security == "starttls":
                smtp.starttls(context=context)
            if self.username:
                password = self.password.get_secret_value() if self.password else ""
                smtp.login(self.username, password)
            smtp.send_message(message)
