{#- Incremental strategy `replace_round`: delete+insert on the partition column (`unique_key`,
    one column: `round`). It deletes the rows of the run's round (run_round()) and of every
    round the new rows carry, then inserts the new rows, in the model's one transaction. Unlike
    dbt's delete+insert it also empties the run's round when it now yields no rows, so
    re-running a round always leaves exactly that round's current rows. -#}
{% macro get_incremental_replace_round_sql(arg_dict) %}
    {%- set target = arg_dict['target_relation'] -%}
    {%- set source = arg_dict['temp_relation'] -%}
    {%- set key = arg_dict['unique_key'] -%}
    {%- if key is none or key is not string -%}
        {{ exceptions.raise_compiler_error(
            "replace_round needs unique_key set to the one partition column, e.g. 'round'") }}
    {%- endif -%}
    {%- set cols = get_quoted_csv(arg_dict['dest_columns'] | map(attribute='name')) -%}
    {%- set r = run_round() -%}
    delete from {{ target }}
    where {{ key }} in (select {{ key }} from {{ source }})
    {%- if r is not none %} or {{ key }} = {{ r | int }}{% endif %};

    insert into {{ target }} ({{ cols }})
    select {{ cols }} from {{ source }}
{% endmacro %}
