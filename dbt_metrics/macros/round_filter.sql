{#- The rows an incremental mart recomputes: `<column> = var('round')` on an incremental run
    given a round, else every round (first build, --full-refresh, or no `round` var). -#}
{% macro round_filter(column='round') -%}
    {%- set r = var('round', none) -%}
    {%- if is_incremental() and r is not none -%}
        {{ column }} = {{ r | int }}
    {%- else -%}
        true
    {%- endif -%}
{%- endmacro %}
