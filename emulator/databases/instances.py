"""RDS instance classes and the max_connections RDS gives them by default (`--db-instance`).

RDS sets max_connections from the instance's memory with parameter-group formulas:

- PostgreSQL: LEAST({DBInstanceClassMemory/9531392}, 5000)
- MySQL and MariaDB: {DBInstanceClassMemory/12582880}

DBInstanceClassMemory is not the nominal memory of the class: RDS subtracts what the operating system
and its own processes reserve, and AWS does not publish the value per class. We model it as

    DBInstanceClassMemory = nominal − (RESERVED_BASE_MIB + RESERVED_FRACTION × nominal)

with the two constants fitted to max_connections values people have read from real instances with
default parameter groups (SHOW max_connections; widely reposted since 2015):

| class (nominal GiB)        | MySQL observed → model | PostgreSQL observed → model |
|----------------------------|------------------------|-----------------------------|
| db.t2.micro (1)            | 66 → 66                | ~87 → 87                    |
| db.t2.small (2)            | 150 → 149              | 198 → 197                   |
| db.t2.medium (4)           | 312 → 317              | 413 → 418                   |
| db.t2.large, m4.large (8)  | 648 → 651              | 856 → 860                   |
| db.r4.large, r3.large (15.25) | 1258 → 1257         | 1660 → 1660                 |
| db.m4.xlarge (16)          | 1320 → 1320            |                             |
| db.r3.xlarge (30.5)        | 2540 → 2533            |                             |
| db.m3.medium / large / xlarge / 2xlarge (3.75 / 7.5 / 15 / 30) | 296 / 609 / 1237 / 2492 → 296 / 609 / 1236 / 2491 | |

Every model value is within 2 % of the observation (most within 0.5 %). Newer (Nitro) classes may reserve slightly
different amounts; read the real value with SHOW max_connections when it matters, and pass it with
--max-connections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UsageError

#: Memory RDS keeps from every instance regardless of size (OS, RDS agents), MiB. Fitted, see above.
RESERVED_BASE_MIB = 210
#: Memory RDS keeps in proportion to the instance size (kernel page tables and the like). Fitted.
RESERVED_FRACTION = 0.02

MIB = 1024 * 1024
GIB = 1024 * MIB

#: Divisors and caps of the RDS default parameter groups.
POSTGRES_BYTES_PER_CONNECTION = 9531392
POSTGRES_MAX_CONNECTIONS_CAP = 5000
MYSQL_BYTES_PER_CONNECTION = 12582880


@dataclass(frozen=True)
class InstanceClass:
    """One RDS DB instance class."""

    name: str
    memory_gib: float

    @property
    def db_instance_class_memory(self) -> int:
        """DBInstanceClassMemory in bytes under the stated assumption."""
        nominal = self.memory_gib * GIB
        return int(nominal - RESERVED_BASE_MIB * MIB - RESERVED_FRACTION * nominal)


def _family(prefix: str, sizes: dict[str, float]) -> dict[str, InstanceClass]:
    return {f"{prefix}.{size}": InstanceClass(f"{prefix}.{size}", gib) for size, gib in sizes.items()}


_BURSTABLE = {"micro": 1, "small": 2, "medium": 4, "large": 8, "xlarge": 16, "2xlarge": 32}
_GENERAL = {"large": 8, "xlarge": 16, "2xlarge": 32, "4xlarge": 64, "8xlarge": 128, "12xlarge": 192, "16xlarge": 256}
_MEMORY = {"large": 16, "xlarge": 32, "2xlarge": 64, "4xlarge": 128, "8xlarge": 256, "12xlarge": 384, "16xlarge": 512}

#: Common RDS instance classes (nominal memory from the AWS instance class tables).
INSTANCE_CLASSES: dict[str, InstanceClass] = {
    **_family("db.t3", _BURSTABLE),
    **_family("db.t4g", _BURSTABLE),
    **_family("db.m5", _GENERAL),
    **_family("db.m6g", _GENERAL),
    **_family("db.m6i", _GENERAL),
    **_family("db.m7g", _GENERAL),
    **_family("db.r5", _MEMORY),
    **_family("db.r6g", _MEMORY),
    **_family("db.r6i", _MEMORY),
    **_family("db.r7g", _MEMORY),
}


def instance_class(name: str) -> InstanceClass:
    """The instance class called `name` (e.g. "db.t3.medium"), or a UsageError listing valid ones."""
    found = INSTANCE_CLASSES.get(name.strip().lower())
    if found is None:
        examples = ", ".join(["db.t3.micro", "db.t4g.medium", "db.m5.large", "db.r6g.xlarge"])
        raise UsageError(f"--db-instance {name!r}: not a known RDS instance class; use one like {examples} "
                         f"(families: db.t3, db.t4g, db.m5, db.m6g, db.m6i, db.m7g, db.r5, db.r6g, db.r6i, db.r7g), "
                         "or give --max-connections")
    return found


def max_connections_for(name: str, engine: str) -> int:
    """RDS's default max_connections for instance class `name` and engine "postgres" or "mysql"."""
    memory = instance_class(name).db_instance_class_memory
    if engine == "postgres":
        return min(math.floor(memory / POSTGRES_BYTES_PER_CONNECTION), POSTGRES_MAX_CONNECTIONS_CAP)
    if engine in ("mysql", "mariadb"):
        return math.floor(memory / MYSQL_BYTES_PER_CONNECTION)
    raise UsageError(f"--engine {engine!r}: RDS max_connections formulas exist for postgres and mysql; use one of them")
